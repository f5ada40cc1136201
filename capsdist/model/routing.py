"""EM routing (Hinton, Sabour, Frosst, "Matrix capsules with EM routing", ICLR 2018, Procedure 1): the one loop.

Index letters (the paper's notation):
    n   routing problem: one image, or one image at one parent position in a conv layer (N' of them)
    i   child capsule, I of them (in a conv layer: K*K kernel positions x input types)
    j   parent capsule, O of them (output types; `o` in the code's shapes)
    h   pose entry, P = 16 (a 4x4 pose matrix, flattened row-major)

Tensors, float32 inside routing whatever the autocast state (float64 if the votes are):
    V          votes                       (N', O, I, P)   parents before children, so each sum is one matmul
    a_in       child activations           (N', I)
    R          assignment probabilities    (N', O, I)      each child's R sums to 1 over every parent it feeds
    mu         parent means (poses)        (N', O, P)
    sigma_sq   parent variances            (N', O, P)
    a_out      parent activations          (N', O)
    beta_u, beta_a   learned per parent type (O,)
    lambda     inverse temperature, rising towards `final_lambda` over the iterations

`route` is Procedure 1, written once; it touches the votes only through a votes backend (`Votes`):
    materialised_votes.MaterialisedVotes  V computed by one batched matmul, VV = [V, V^2] contracted in torch,
                                          the gradient of V written once (vote_tape.py)
    fused_votes.FusedVotes                V = M W + offsets rebuilt in registers by Triton kernels, never stored
The layers hand either one the same factors (`VoteFactors`) and E-step normaliser; model.routing_impl picks.

Procedure 1, line by line, and where each step lives:
    M-step  Ra_ij      = R_ij * a_i * (data scale, pitfall 2)                                  route, Votes.moments
            mu_jh      = sum_i Ra_ij V_ijh / sum_i Ra_ij                                       m_step
            sigma_sq_jh= sum_i Ra_ij (V_ijh - mu_jh)^2 / sum_i Ra_ij + variance floor  (pitfall 1)   m_step
            cost_jh    = (beta_u + log sigma_jh) * sum_i Ra_ij                                 m_step
            a_j        = logistic(lambda * (beta_a - sum_h cost_jh))                           m_step, route
    E-step  log p_ij   = -sum_h (V_ijh - mu_jh)^2 / (2 sigma_sq_jh) - sum_h log sigma_jh - P/2 log(2 pi)
            R_ij       = softmax over every parent j that receives child i of (log p_ij / T + log a_j)  (pitfall 3)
                                                                                               Votes.e_step
            T, the E-step temperature, is 1 in the paper; T > 1 softens the assignments, which otherwise go each to
            one parent after two E-steps (docs/results.md).
    lambda  rises over the iterations as final_lambda * (1 - 0.95^(t+1)): the schedule Hinton gave in answer
            to a question on OpenReview (forum HJWLfGWRb), as quoted in IBM's em_routing.py (Gritzman's code,
            "final_lambda is set to 0.01"); the paper itself gives no schedule.
The backends return the M-step's sums, sum_i Ra [1, V, V^2], about the a_in-weighted mean vote (`Votes.centre`):
routing is translation-equivariant (means shift, variances and assignments do not), and the moment form of the
variance keeps float32 precision about that origin.

Gritzman (2019), "Avoiding implementation pitfalls of 'Matrix capsules with EM routing' by Hinton et al.",
numbered as in his paper:
    pitfall 1  a parent with only one child would have zero variance and log sigma = -inf: a variance floor
               (`variance_floor`) is added to every variance (Gritzman's code 1e-9, the authors' 5e-4; capsdist's
               1e-4 lies above float32 rounding and below the smallest variances: docs/results.md).
    pitfall 2  the amount of data sent to a parent grows with the fan-in (I / O children per parent): sum_i Ra_ij
               is scaled by DATA_SCALE * O / I, so one lambda and beta setting fits layers of very different
               fan-in.
    pitfall 3  parents at different positions compete for the same child: in conv layers the E-step normalises
               a child's assignments over all parents at all positions whose windows hold it (the `Normaliser`
               handed to the backend, see layers.ConvCaps), not per window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Protocol

import torch

P = 16
DATA_SCALE = 100.0  # pitfall 2: an average parent receives about 100 units of R*a (Gritzman's setting)
LOG_2PI = math.log(2.0 * math.pi)

# Pitfall 3: per-window log-sum-exps over parents L (N', I) -> each child's log normaliser log_z (N', I), so that
# R = exp(x - log_z) sums to 1 over every parent of every window holding the child. The identity routes fully
# connected (one window).
Normaliser = Callable[[torch.Tensor], torch.Tensor]


def fully_connected(L: torch.Tensor) -> torch.Tensor:
    """The Normaliser of fully connected routing (one window per child): log_z = L."""
    return L


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
# capsdist's recipe (docs/results.md): 2 iterations and an E-step temperature of 4 learn faster, and beta_a at
# 1000x makes the learned bias move the activation logit (the last lambda is ~1e-3: unscaled, beta_a is inert)
RECIPE = dataclasses.replace(PAPER, iterations=2, estep_temperature=4.0, beta_a_scale=1000.0)


class VoteFactors(NamedTuple):
    """The votes of a layer as their factors: V_noi = M_gnc W_go + offsets_gc for child i = g C + c.

    Children come in G groups of C that share one 4x4 transform per parent (ConvCaps: a group per kernel position
    and input type, C = 1; ClassCaps: a group per input type, C = positions). Any float dtype.
    """

    M: torch.Tensor  # (G, N', C, 16) child poses
    W: torch.Tensor  # (G, O, 4, 4) transforms
    offsets: torch.Tensor | None  # broadcastable to (G, C, 16), added to every vote of the child (or None)


class Parents(NamedTuple):
    """What an M-step finds for the parents: Gaussians (N', O, P) and the activations' logits (N', O)."""

    mu: torch.Tensor  # parent means (poses), about the backend's origin (`Votes.centre`)
    sigma_sq: torch.Tensor  # variances, floor included
    log_sigma_sq: torch.Tensor
    logit: torch.Tensor  # lambda * (beta_a - cost): a_j = logistic(logit)


class Votes(Protocol):
    """The votes of one routing call, held by a backend (materialised_votes.py, fused_votes.py). Use one per call:
    `centre` first, then the backend's assignments go from `start` or `e_step` to `moments`."""

    dtype: torch.dtype  # what routing computes in
    parents: int  # O
    children: int  # I

    def centre(self, a_in: torch.Tensor) -> torch.Tensor:
        """a_in (N', I) -> the a_in-weighted mean vote (N', O, P), no gradient: the origin of every sum after."""

    def start(self, log_R0: torch.Tensor) -> Any:
        """The initial assignments from log_R0 (N', I), each child's log R to each of its parents."""

    def moments(self, assignments: Any, a_scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ra = R * a_scaled (N', I) -> sum_i Ra (N', O), sum_i Ra V and sum_i Ra V^2 (N', O, P), V about the origin."""

    def e_step(self, parents: Parents, temperature: float) -> tuple[Any, torch.Tensor]:
        """Procedure 1's E-step: the new assignments and their entropy (`assignment_entropy`, (N', I))."""


class RoutingResult(NamedTuple):
    """Outputs of one routing call: poses (N', O, P), a_out (N', O), entropy (N', I): sum over parents of -R log R
    for each (problem, child), no gradient; assignments: the last M-step's, in the backend's form."""

    poses: torch.Tensor
    a_out: torch.Tensor
    entropy: torch.Tensor
    assignments: Any


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype routing computes in for votes or poses of `dtype`: float32 for half precision, else their own."""
    return torch.promote_types(dtype, torch.float32)


def inverse_temperatures(iterations: int, final_lambda: float) -> list[float]:
    """lambda for each iteration: final_lambda * (1 - 0.95^(t+1)), Hinton's schedule (module docstring)."""
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]


def centre_weights(a_in: torch.Tensor) -> torch.Tensor:
    """a_in (N', I) -> the weights (N', I) of the origin, the a_in-weighted mean vote (`Votes.centre`): inactive
    children's votes, however far, cannot move it; uniform where no child is active."""
    total = a_in.sum(dim=1, keepdim=True)  # (N', 1)
    return torch.where(total > 0, a_in / total.clamp_min(1e-30), 1.0 / a_in.shape[1])


@torch.no_grad()
def assignment_entropy(L: torch.Tensor, log_z: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """sum over a window's parents of -R log R, (N', I), for R_noi = exp(x_noi - log_z_ni), from the window's
    L = logsumexp_o x and X = sum_o softmax_o(x) x (all (N', I)): it equals exp(L - log_z) (log_z - X)."""
    return torch.exp(L - log_z) * (log_z - X)


def m_step(
    votes: Votes,
    assignments: Any,
    a_scaled: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lam: float,
    settings: RoutingSettings,
    before: Parents | None,
) -> Parents:
    """Procedure 1's M-step: the parents' Gaussians and activations from the assignments.

    a_scaled (N', I) child activations times the data scale (pitfall 2); `before` the previous iteration's parents,
    for the moving average `alpha` (None on the first).
    """
    sum_Ra, sum_RaV, sum_RaV2 = votes.moments(assignments, a_scaled)  # (N', O), (N', O, P), (N', O, P)
    denom = sum_Ra.unsqueeze(-1).clamp_min(1e-10)  # a guard for parents with no data, exact otherwise
    mu_new = sum_RaV / denom  # (N', O, P)
    alpha = settings.alpha
    mu = mu_new if (before is None or alpha == 0.0) else (1.0 - alpha) * mu_new + alpha * before.mu
    # E[(V - mu)^2] = E[V^2] - 2 mu E[V] + mu^2 (exact for any mu, also when alpha moves mu off the mean)
    mean_sq = sum_RaV2 / denom
    sigma_sq = (mean_sq - 2.0 * mu * mu_new + mu * mu).clamp_min(0.0) + settings.variance_floor  # pitfall 1
    log_sigma_sq = torch.log(sigma_sq)
    cost = (beta_u.unsqueeze(-1) + 0.5 * log_sigma_sq) * sum_Ra.unsqueeze(-1)  # (N', O, P)
    return Parents(mu, sigma_sq, log_sigma_sq, lam * (beta_a - cost.sum(dim=-1)))


def route(
    votes: Votes,
    a_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    log_R0: torch.Tensor,
    settings: RoutingSettings,
) -> RoutingResult:
    """EM routing, Procedure 1, over any votes backend. Runs in votes.dtype whatever the autocast state.

    a_in (N', I); beta_u, beta_a (O,); log_R0 (N', I): each child's initial log assignment to each of its parents
    (uniform over them). Every setting but class_lambda_scale applies (CapsNet gives the class layer its scaled
    final_lambda).
    """
    with torch.autocast(device_type=a_in.device.type, enabled=False):
        a_in, log_R0 = a_in.to(votes.dtype), log_R0.to(votes.dtype)
        origin = votes.centre(a_in)  # (N', O, P)
        a_scaled = a_in * (DATA_SCALE * votes.parents / votes.children)  # (N', I), pitfall 2
        beta_a = beta_a * settings.beta_a_scale
        assignments = votes.start(log_R0)
        # every parent of a child starts at log R0: x = log_R0 with log_z = 0
        entropy = assignment_entropy(log_R0 + math.log(votes.parents), torch.zeros_like(log_R0), log_R0)
        parents = None
        lambdas = inverse_temperatures(settings.iterations, settings.final_lambda)
        for t, lam in enumerate(lambdas):
            parents = m_step(votes, assignments, a_scaled, beta_u, beta_a, lam, settings, parents)
            if t < len(lambdas) - 1:
                assignments, entropy = votes.e_step(parents, settings.estep_temperature)
        poses = parents.mu + origin
    return RoutingResult(poses, torch.sigmoid(parents.logit), entropy, assignments)
