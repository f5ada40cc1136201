"""EM routing (Hinton, Sabour, Frosst, "Matrix capsules with EM routing", ICLR 2018, Procedure 1).

Index letters (the paper's notation):
    n   routing problem: one image, or one image at one parent position in a conv layer (N' of them)
    i   child capsule, I of them (in a conv layer: K*K kernel positions x input types)
    j   parent capsule, O of them (output types)
    h   pose entry, P = 16 (a 4x4 pose matrix, flattened row-major)

Tensors, all float32 inside routing (autocast is disabled here; see `em_routing`):
    V          votes                       (N', O, I, P)   the internal layout: parents before children,
                                                          so each M-step and E-step sum is one batched matmul
    a_in       child activations           (N', I)
    R          assignment probabilities    (N', O, I)      each child's R sums to 1 over every parent it feeds
    mu         parent means (poses)        (N', O, P)
    sigma_sq   parent variances            (N', O, P)
    a_out      parent activations          (N', O)
    beta_u, beta_a   learned per parent type (O,)
    lambda     inverse temperature, rising towards `final_lambda` over the iterations

One iteration of Procedure 1 (`m_step`, then `e_step` on every iteration but the last):
    M-step  Ra_ij      = R_ij * a_i * (data scale, pitfall 2)
            mu_jh      = sum_i Ra_ij V_ijh / sum_i Ra_ij
            sigma_sq_jh= sum_i Ra_ij (V_ijh - mu_jh)^2 / sum_i Ra_ij + variance floor   (pitfall 1)
            cost_jh    = (beta_u + log sigma_jh) * sum_i Ra_ij
            a_j        = logistic(lambda * (beta_a - sum_h cost_jh))
    E-step  log p_ij   = -sum_h (V_ijh - mu_jh)^2 / (2 sigma_sq_jh) - sum_h log sigma_jh - P/2 log(2 pi)
            R_ij       = softmax over every parent j that receives child i of (log p_ij / T + log a_j)  (pitfall 3)
            T, the E-step temperature, is 1 in the paper. A sum over P = 16 pose entries makes log p so sharp
            that after two E-steps each child goes to one parent, and learning slows several-fold with each
            iteration (docs/results.md); T > 1 softens the assignments (T = 16: the mean log-density per entry).
    lambda  rises over the iterations as final_lambda * (1 - 0.95^(t+1)): the schedule Hinton gave in answer
            to a question on OpenReview (forum HJWLfGWRb), as quoted in IBM's em_routing.py (Gritzman's code,
            "final_lambda is set to 0.01"); the paper itself gives no schedule.

Gritzman (2019), "Avoiding implementation pitfalls of 'Matrix capsules with EM routing' by Hinton et al.",
numbered as in his paper:
    pitfall 1  a parent with only one child would have zero variance and log sigma = -inf: a variance floor
               (`variance_floor`) is added to every variance. Gritzman's code adds 1e-9, the authors' 5e-4;
               capsdist's 1e-4 was measured to lie between two limits (quickstart model, one batch of 32
               Fashion-MNIST images, float32 against float64): the float32 moment form below is off by up to
               4e-5 (ConvCaps1 after 20 training steps, variances of 0.3 to 8), so a much smaller floor would be
               rounding noise where a parent has one child; at initialisation the class capsules' variances
               are 1.8e-4 to 8e-4 (median), so the authors' 5e-4 would already set them. No variance measured
               fell below 1e-4.
    pitfall 2  the amount of data sent to a parent grows with the fan-in (I / O children per parent): sum_i Ra_ij
               is scaled by DATA_SCALE * O / I, so one lambda and beta setting fits layers of very different
               fan-in.
    pitfall 3  parents at different positions compete for the same child: in conv layers the E-step normalises
               a child's assignments over all parents at all positions whose windows hold it (`normalise`
               argument, see layers.ConvCaps), not per window.

The fast path: the M-step needs sum_i Ra V and sum_i Ra V^2, the E-step needs sum_h V^2 / sigma_sq and
sum_h V mu / sigma_sq. With VV = [V, V^2] (N', O, I, 2P) built once, each is one batched matrix product
that reads VV once, only VV is kept for backward (no per-iteration (V - mu)^2 tensors), and the gradient of
the votes is written once for all iterations (vote_tape.py). To keep the expanded
squares exact enough in float32, votes are first centred on their a_in-weighted mean over the children
(routing is translation-equivariant: means shift, variances and assignments do not).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from capsdist.model.vote_tape import PlainVotes, TapedVotes, routed_votes

P = 16
DATA_SCALE = 100.0  # pitfall 2: an average parent receives about 100 units of R*a (Gritzman's setting)
LOG_2PI = math.log(2.0 * math.pi)

Normaliser = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """The settings of EM routing, one object for the model's layers and the run config (model.* keys).

    The defaults are the paper's (PAPER); capsdist's measured recipe (RECIPE) is what the run config starts
    from. Every field is used by `route` except class_lambda_scale, which CapsNet applies to the class layer.
    """

    iterations: int = 3  # EM iterations (the paper: 3)
    final_lambda: float = 0.01  # inverse temperature reached by the schedule (Hinton on OpenReview: 0.01)
    alpha: float = 0.0  # moving average of poses across iterations: mu_t = (1 - alpha) mu_new + alpha mu_(t-1)
    #                     (the paper: 0; the authors' code: 0.1)
    variance_floor: float = 1e-4  # added to every parent variance (pitfall 1; see the module docstring)
    estep_temperature: float = 1.0  # E-step log-likelihoods are divided by this (the paper: 1)
    class_lambda_scale: float = 1.0  # the class layer routes with final_lambda * this (the authors' code: 1/4)
    beta_a_scale: float = 1.0  # routing sees beta_a * this, the learned beta_a stays O(1) (authors' code: 5000)

    def __post_init__(self):
        if self.iterations < 1:
            raise ValueError(f"routing needs at least one iteration, got {self.iterations}")


PAPER = RoutingSettings()
# capsdist's recipe (docs/results.md): 2 iterations and an E-step temperature of 4 learn several times faster
# and beta_a at 1000x lets the learned bias move the activation logit: at final_lambda 0.01 the last iteration's
# lambda is ~1e-3, so an unscaled beta_a shifts the logit by ~1e-3 and is inert (+0.7 points after one epoch)
RECIPE = dataclasses.replace(PAPER, iterations=2, estep_temperature=4.0, beta_a_scale=1000.0)


class RoutingResult(NamedTuple):
    """Outputs of one routing call. poses (N', O, P), a_out (N', O), log_R (N', O, I) of the last M-step."""

    poses: torch.Tensor
    a_out: torch.Tensor
    log_R: torch.Tensor


class Parents(NamedTuple):
    """What an M-step finds for the parents: Gaussians (N', O, P) and the activations' logits (N', O)."""

    mu: torch.Tensor  # parent means (poses), centred like the votes
    sigma_sq: torch.Tensor  # variances, floor included
    log_sigma_sq: torch.Tensor
    logit: torch.Tensor  # lambda * (beta_a - cost): a_j = logistic(logit)


def routing_dtype(V: torch.Tensor) -> torch.dtype:
    """The dtype routing computes in: float32 for half-precision votes, else the votes' own (float32/64)."""
    return torch.promote_types(V.dtype, torch.float32)


def normalise_over_parents(log_p: torch.Tensor) -> torch.Tensor:
    """Fully connected E-step normalisation: log softmax over parents. log_p (N', O, I) -> log R (N', O, I)."""
    return log_p - torch.logsumexp(log_p, dim=1, keepdim=True)


def inverse_temperatures(iterations: int, final_lambda: float) -> list[float]:
    """lambda for each iteration: final_lambda * (1 - 0.95^(t+1)), Hinton's schedule (module docstring)."""
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]


def m_step(
    votes: TapedVotes | PlainVotes,
    log_R: torch.Tensor,
    a_scaled: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lam: float,
    settings: RoutingSettings,
    mu_before: torch.Tensor | None,
) -> Parents:
    """Procedure 1's M-step: the parents' Gaussians and activations from the assignments.

    log_R (N', O, I) log assignments; a_scaled (N', 1, I) child activations times the data scale (pitfall 2);
    mu_before (N', O, P) the previous iteration's means, for the moving average `alpha` (None on the first).
    """
    Ra = torch.exp(log_R) * a_scaled  # (N', O, I)
    sum_Ra = Ra.sum(dim=2)  # (N', O)
    moments = votes.moments(Ra)  # (N', O, 2P): sum Ra V, sum Ra V^2
    return parents_from_moments(sum_Ra, moments[..., :P], moments[..., P:], beta_u, beta_a, lam, settings, mu_before)


def parents_from_moments(
    sum_Ra: torch.Tensor,
    sum_RaV: torch.Tensor,
    sum_RaV2: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lam: float,
    settings: RoutingSettings,
    mu_before: torch.Tensor | None,
) -> Parents:
    """The rest of the M-step, from the moments of the votes about any origin (the fused path's is not 0):
    sum_Ra (N', O) = sum_i Ra_ij, sum_RaV and sum_RaV2 (N', O, P) = sum_i Ra_ij V_ijh and sum_i Ra_ij V_ijh^2.
    mu_before and the returned means are about the same origin.
    """
    denom = sum_Ra.unsqueeze(-1).clamp_min(1e-10)  # a guard for parents with no data, exact otherwise
    mu_new = sum_RaV / denom  # (N', O, P)
    alpha = settings.alpha
    mu = mu_new if (mu_before is None or alpha == 0.0) else (1.0 - alpha) * mu_new + alpha * mu_before
    # E[(V - mu)^2] = E[V^2] - 2 mu E[V] + mu^2 (exact for any mu, also when alpha moves mu off the mean)
    mean_sq = sum_RaV2 / denom
    sigma_sq = (mean_sq - 2.0 * mu * mu_new + mu * mu).clamp_min(0.0) + settings.variance_floor  # pitfall 1
    log_sigma_sq = torch.log(sigma_sq)
    cost = (beta_u.unsqueeze(-1) + 0.5 * log_sigma_sq) * sum_Ra.unsqueeze(-1)  # (N', O, P)
    return Parents(mu, sigma_sq, log_sigma_sq, lam * (beta_a - cost.sum(dim=-1)))


def e_step(votes: TapedVotes | PlainVotes, parents: Parents, normalise: Normaliser, temperature: float) -> torch.Tensor:
    """Procedure 1's E-step: log assignments (N', O, I) from the parents' Gaussians and activations.

    sum_h (V - mu)^2 / sigma_sq = VV . [-2 mu / sigma_sq, 1 / sigma_sq] + sum_h mu^2 / sigma_sq.
    """
    mu, sigma_sq, log_sigma_sq, logit = parents
    inv = 1.0 / sigma_sq
    coef = torch.cat([-2.0 * mu * inv, inv], dim=-1)  # (N', O, 2P)
    dist = votes.quadratic(coef) + (mu * mu * inv).sum(-1, keepdim=True)  # (N', O, I)
    log_p = -0.5 * dist.clamp_min(0.0) - 0.5 * log_sigma_sq.sum(-1, keepdim=True) - 0.5 * P * LOG_2PI
    # log a_j by logsigmoid: finite even where a_j underflows
    return normalise(log_p / temperature + F.logsigmoid(logit).unsqueeze(-1))


def route(
    V: torch.Tensor,
    a_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    log_R0: torch.Tensor,
    normalise: Normaliser,
    settings: RoutingSettings,
) -> RoutingResult:
    """EM routing in the internal layout. Runs in float32 (float64 if given) whatever the autocast state.

    V (N', O, I, P) votes in any strides and float dtype (read once to centre, once to build VV, never copied);
    a_in (N', I); beta_u, beta_a (O,); log_R0 (N', O, I) initial log assignments (uniform over each child's
    parents); `normalise` maps E-step log-likelihoods (N', O, I) to log R. Every setting but
    class_lambda_scale applies.
    """
    with torch.autocast(device_type=V.device.type, enabled=False):
        dtype = routing_dtype(V)
        a_in, log_R0 = a_in.to(dtype), log_R0.to(dtype)
        O, I = V.shape[1:3]
        # Routing is translation-equivariant, so the centre can be a constant: no gradient flows through it.
        # It is the a_in-weighted mean vote, so inactive children's votes, however far, cannot move it.
        with torch.no_grad():
            total = a_in.sum(dim=1, keepdim=True)  # (N', 1)
            weights = torch.where(total > 0, a_in / total.clamp_min(1e-30), 1.0 / I)  # (N', I)
            centre = torch.einsum("ni,noip->nop", weights, V.to(dtype) if V.dtype != dtype else V)  # (N', O, P)
        votes = routed_votes(V, centre)  # VV = [V - centre, (V - centre)^2] (N', O, I, 2P), gradient fused
        a_scaled = (a_in * (DATA_SCALE * O / I)).unsqueeze(1)  # (N', 1, I), pitfall 2
        beta_a = beta_a * settings.beta_a_scale
        log_R, parents = log_R0, None
        lambdas = inverse_temperatures(settings.iterations, settings.final_lambda)
        for t, lam in enumerate(lambdas):
            parents = m_step(
                votes, log_R, a_scaled, beta_u, beta_a, lam, settings, None if parents is None else parents.mu
            )
            if t < len(lambdas) - 1:
                log_R = e_step(votes, parents, normalise, settings.estep_temperature)
        poses = parents.mu + centre
    return RoutingResult(poses, torch.sigmoid(parents.logit), log_R)


def em_routing(
    votes: torch.Tensor,
    a_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    settings: RoutingSettings = PAPER,
    **changes,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully connected EM routing, the public functional form.

    votes (N, I, O, P) with P = 16; a_in (N, I); beta_u, beta_a (O,). `settings` (the paper's by default),
    with any of its fields changed by keyword (`iterations=2`). Returns poses (N, O, P) and a_out (N, O).
    """
    settings = dataclasses.replace(settings, **changes)
    if votes.dim() != 4 or votes.shape[-1] != P:
        raise ValueError(f"votes must be (N, I, O, {P}), got {tuple(votes.shape)}")
    n, I, O, _ = votes.shape
    if a_in.shape != (n, I):
        raise ValueError(f"a_in must be (N, I) = {(n, I)}, got {tuple(a_in.shape)}")
    V = votes.transpose(1, 2)  # (N, O, I, P)
    log_R0 = torch.full((n, O, I), -math.log(O), dtype=routing_dtype(votes), device=votes.device)  # uniform 1/O
    result = route(V, a_in, beta_u, beta_a, log_R0, normalise_over_parents, settings)
    return result.poses, result.a_out
