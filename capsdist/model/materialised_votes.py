"""The materialised votes backend of routing.route (model.routing_impl torch): V is computed and kept.

The votes are one batched matmul of the child poses with `pose_transform_matrix` (bfloat16 under autocast), then
routing reads them as VV = [V - c, (V - c)^2] (N', O, I, 2P) about the centre c: each M-step's sums are one
matmul Ra @ VV, each E-step's distance one VV @ coef, and the gradient of V is written once for all of them
(vote_tape.py). Also `em_routing`, routing over given votes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from capsdist.model.routing import (
    LOG_2PI,
    PAPER,
    P,
    Normaliser,
    Parents,
    RoutingSettings,
    VoteFactors,
    assignment_entropy,
    centre_weights,
    fully_connected,
    route,
    routing_dtype,
)
from capsdist.model.vote_tape import routed_votes


def pose_transform_matrix(weight: torch.Tensor) -> torch.Tensor:
    """weight (G, O, 4, 4) -> (G, 16, O * 16) such that flat(M) @ result = [flat(M @ weight[g, o]) for o].

    Entry [(r, c), (o, s, d)] is delta(r, s) * weight[o, c, d]. With it, one batched matmul writes votes with
    each 16-entry pose contiguous, which routing then reads in 64-byte runs: the plain (4 x 4) @ (4 x O*4)
    product is cheaper but scatters every pose over four runs of 4 floats, slower to read (docs/benchmarks.md).
    """
    g, o = weight.shape[:2]
    eye = torch.eye(4, dtype=weight.dtype, device=weight.device)
    return torch.einsum("rs,gocd->grcosd", eye, weight).reshape(g, 16, o * 16)


def materialise(factors: VoteFactors) -> torch.Tensor:
    """The votes (N', O, I, 16) of `factors`, children ordered (group, c): a view of one batched matmul's output
    (plus the offsets, when there are any), which routing reads once and never copies."""
    M, W, offsets = factors
    G, N, C, _ = M.shape
    O = W.shape[1]
    V = torch.bmm(M.reshape(G, N * C, P), pose_transform_matrix(W).to(M.dtype))  # (G, N' C, O 16)
    V = V.view(G, N, C, O, P).permute(1, 3, 0, 2, 4)  # (N', O, G, C, 16)
    if offsets is not None:
        V = V + offsets.to(V.dtype)  # broadcast over (G, C, 16)
    return V.flatten(2, 3)


class MaterialisedVotes:
    """routing.Votes over votes V (N', O, I, P), in any strides and float dtype (read once to centre, once to
    build VV, never copied). `normaliser` maps per-window log-sum-exps to log normalisers (routing.Normaliser)."""

    def __init__(self, V: torch.Tensor, normaliser: Normaliser = fully_connected):
        self.V = V
        self.dtype = routing_dtype(V.dtype)
        self.parents, self.children = V.shape[1:3]
        self.normaliser = normaliser

    @classmethod
    def from_factors(cls, factors: VoteFactors, normaliser: Normaliser = fully_connected) -> "MaterialisedVotes":
        return cls(materialise(factors), normaliser)

    def centre(self, a_in: torch.Tensor) -> torch.Tensor:
        """The a_in-weighted mean vote (N', O, P) (routing.centre_weights); builds VV about it. No gradient flows
        through it (routing is translation-equivariant)."""
        V, dtype = self.V, self.dtype
        with torch.no_grad():
            weights = centre_weights(a_in)  # (N', I)
            centre = torch.einsum("ni,noip->nop", weights, V.to(dtype) if V.dtype != dtype else V)  # (N', O, P)
        self.VV = routed_votes(V, centre)  # VV = [V - centre, (V - centre)^2] (N', O, I, 2P), gradient fused
        return centre

    def start(self, log_R0: torch.Tensor) -> torch.Tensor:
        """log R (N', O, I): log_R0 (N', I) for every parent."""
        return log_R0.unsqueeze(1).expand(-1, self.parents, -1)

    def moments(self, log_R: torch.Tensor, a_scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log R (N', O, I), a_scaled (N', I) -> sum_i Ra (N', O), sum_i Ra V, sum_i Ra V^2 (N', O, P)."""
        Ra = torch.exp(log_R) * a_scaled.unsqueeze(1)  # (N', O, I)
        sum_Ra = Ra.sum(dim=2)  # (N', O)
        moments = self.VV.moments(Ra)  # (N', O, 2P)
        return sum_Ra, moments[..., :P], moments[..., P:]

    def e_step(self, parents: Parents, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """log R (N', O, I) and its entropy (N', I).

        sum_h (V - mu)^2 / sigma_sq = VV . [-2 mu / sigma_sq, 1 / sigma_sq] + sum_h mu^2 / sigma_sq.
        """
        mu, sigma_sq, log_sigma_sq, logit = parents
        inv = 1.0 / sigma_sq
        coef = torch.cat([-2.0 * mu * inv, inv], dim=-1)  # (N', O, 2P)
        dist = self.VV.quadratic(coef) + (mu * mu * inv).sum(-1, keepdim=True)  # (N', O, I)
        log_p = -0.5 * dist.clamp_min(0.0) - 0.5 * log_sigma_sq.sum(-1, keepdim=True) - 0.5 * P * LOG_2PI
        # log a_j by logsigmoid: finite even where a_j underflows
        x = log_p / temperature + F.logsigmoid(logit).unsqueeze(-1)  # (N', O, I)
        L = torch.logsumexp(x, dim=1)  # (N', I)
        log_z = self.normaliser(L)  # (N', I), pitfall 3
        with torch.no_grad():
            X = (torch.exp(x - L.unsqueeze(1)) * x).sum(1)  # (N', I)
        return x - log_z.unsqueeze(1), assignment_entropy(L, log_z, X)


def em_routing(
    votes: torch.Tensor,
    a_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    settings: RoutingSettings = PAPER,
    **changes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully connected EM routing over given votes, the public functional form.

    votes (N, I, O, P) with P = 16; a_in (N, I); beta_u, beta_a (O,). `settings` (the paper's by default),
    with any of its fields changed by keyword (`iterations=2`). Returns poses (N, O, P) and a_out (N, O).
    """
    settings = dataclasses.replace(settings, **changes)
    if votes.dim() != 4 or votes.shape[-1] != P:
        raise ValueError(f"votes must be (N, I, O, {P}), got {tuple(votes.shape)}")
    n, I, O, _ = votes.shape
    if a_in.shape != (n, I):
        raise ValueError(f"a_in must be (N, I) = {(n, I)}, got {tuple(a_in.shape)}")
    backend = MaterialisedVotes(votes.transpose(1, 2))  # (N, O, I, P)
    log_R0 = torch.full((n, I), -math.log(O), dtype=backend.dtype, device=votes.device)  # uniform 1/O
    result = route(backend, a_in, beta_u, beta_a, log_R0, settings)
    return result.poses, result.a_out
