"""Fused EM routing: routing.route's Procedure 1 (m_step, then e_step), with the votes never written to memory.

The votes are held as their factors (`FusedVotes`, see fused_kernels.py):
    M        child poses per routing problem       (N', I, 16)
    W        transforms per child and parent       (I, O, 16)   ConvCaps: one per kernel position and type;
                                                                ClassCaps: its type's, repeated over positions
    offsets  a constant added to each child's vote (I, 16) or None (ClassCaps' coordinate addition)
Each vote V_noi = M_ni W_io + offsets_i is rebuilt in registers by every kernel that needs it. Two autograd
functions wrap the kernels; the small per-parent and per-child steps between them are plain torch, and the M-step
after its sums is routing.parents_from_moments itself (the torch path's):
    FusedMoments  the M-step sums S0 (N', O), S1, S2 (N', O, 16) for the assignments of the last E-step
    FusedLSE      the E-step's log-sum-exp over the parents of each (problem, child), L (N', I)
The E-step normalisation is passed as `combine`, mapping L (N', I) to each child's log normaliser log_z (N', I):
identity for ClassCaps, a log-sum-exp over every window that holds the child for ConvCaps (pitfall 3). Then
log R_noi = x_noi - log_z_ni, recomputed in the next M-step's kernel from x's terms (`EStepTerms`).

The M-step sums are taken about a shift (the previous iteration's mean; at the first, the a_in-weighted mean
vote), so the moment form E[(V - mu)^2] = E[(V - s)^2] - 2 (mu - s) E[V - s] + (mu - s)^2 keeps float32
precision, as routing.py's centring does; the result does not depend on the shift, so no gradient flows through it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import triton
from torch.autograd import Function
from triton.runtime.interpreter import InterpretedFunction

from capsdist.model import fused_kernels as K
from capsdist.model.routing import (
    DATA_SCALE,
    LOG_2PI,
    P,
    Parents,
    RoutingSettings,
    inverse_temperatures,
    parents_from_moments,
)


class Blocks(NamedTuple):
    """Tile sizes (powers of 2). A tile of BN problems x BO parents x 16 pose entries lives in registers: on the
    GPU 8 x 8 x 16 keeps about ten live tiles at 8 floats per thread of 4 warps; the interpreter runs programs
    one after another, so there fewer, larger tiles are faster."""

    n: int  # routing problems per program
    o: int  # parents per program (moments and backward; lse takes all O at once)
    i: int  # children per program (lse)
    lse_rows: int  # problems x parents per lse program (its BN = lse_rows // next_power_of_2(O))


GPU_BLOCKS = Blocks(n=8, o=8, i=16, lse_rows=128)
INTERPRETER_BLOCKS = Blocks(n=64, o=32, i=64, lse_rows=2048)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at import): CPU tensors work."""
    return isinstance(K.moments_kernel, InterpretedFunction)


def _blocks(N: int, O: int, I: int) -> Blocks:
    """The tile sizes for N problems, O parents and I children, clamped to them."""
    b = INTERPRETER_BLOCKS if interpreter_enabled() else GPU_BLOCKS
    n, o = triton.next_power_of_2(N), triton.next_power_of_2(O)
    return Blocks(n=min(b.n, n), o=min(b.o, o), i=min(b.i, I), lse_rows=max(1, min(b.lse_rows // o, n)))


class EStepTerms(NamedTuple):
    """An E-step's terms per parent, from which the kernels rebuild x_noi = b_no - 1/2 sum_h (V_noih - mu_noh)^2
    inv_noh, the E-step logit of child i for parent o (log p / T + log a_o, as routing.e_step's)."""

    mu: torch.Tensor  # (N', O, P) parent means
    inv: torch.Tensor  # (N', O, P) 1 / (sigma_sq T)
    b: torch.Tensor  # (N', O) (-1/2 sum_h log sigma_sq_h - P/2 log 2 pi) / T + log a_o


class FusedMoments(Function):
    """(M, W, offsets, mu, inv, b, c, a, shift) -> S0 (N', O), S1, S2 (N', O, 16).

    log R_noi = c_ni (+ x_noi when mu is not None); Ra = exp(log R) a_ni;
    S0 = sum_i Ra, S1 = sum_i Ra (V - shift), S2 = sum_i Ra (V - shift)^2.
    """

    @staticmethod
    def forward(ctx, M, W, offsets, mu, inv, b, c, a, shift):
        N, I, _ = M.shape
        O = W.shape[1]
        has_e = mu is not None
        S0 = M.new_empty(N, O)
        S1, S2 = M.new_empty(N, O, P), M.new_empty(N, O, P)
        bn, bo = _blocks(N, O, I)[:2]
        e = (mu, inv, b) if has_e else (shift, shift, shift)  # unused pointers when not has_e
        K.moments_kernel[(triton.cdiv(N, bn), triton.cdiv(O, bo))](
            M,
            W,
            offsets if offsets is not None else M,
            *e,
            c,
            a,
            shift,
            S0,
            S1,
            S2,
            N,
            I,
            O,
            HAS_C=offsets is not None,
            HAS_E=has_e,
            BN=bn,
            BO=bo,
        )
        ctx.save_for_backward(M, W, offsets, *e, c, a, shift)
        ctx.has_e = has_e
        return S0, S1, S2

    @staticmethod
    def backward(ctx, gS0, gS1, gS2):
        M, W, offsets, mu, inv, b, c, a, shift = ctx.saved_tensors
        gS = (gS0.contiguous(), gS1.contiguous(), gS2.contiguous())
        gM, gW, gmu, ginv, gb, gc, ga = _backward(
            M, W, offsets, mu, inv, b, has_e=ctx.has_e, c=c, a=a, shift=shift, gS=gS
        )
        if not ctx.has_e:
            gmu = ginv = gb = None
        return gM, gW, None, gmu, ginv, gb, gc, ga, None


class FusedLSE(Function):
    """(M, W, offsets, mu, inv, b) -> L (N', I) = logsumexp over o of x_noi, and X (N', I) = the softmax-weighted
    mean of x over o (no gradient; for the assignment entropy)."""

    @staticmethod
    def forward(ctx, M, W, offsets, mu, inv, b):
        N, I, _ = M.shape
        O = W.shape[1]
        L, X = M.new_empty(N, I), M.new_empty(N, I)
        _, _, bi, bn = _blocks(N, O, I)
        K.lse_kernel[(triton.cdiv(N, bn), triton.cdiv(I, bi))](
            M,
            W,
            offsets if offsets is not None else M,
            mu,
            inv,
            b,
            L,
            X,
            N,
            I,
            O,
            HAS_C=offsets is not None,
            BN=bn,
            BO=triton.next_power_of_2(O),
            BI=bi,
        )
        ctx.save_for_backward(M, W, offsets, mu, inv, b, L)
        ctx.mark_non_differentiable(X)
        return L, X

    @staticmethod
    def backward(ctx, gL, _gX):
        M, W, offsets, mu, inv, b, L = ctx.saved_tensors
        gM, gW, gmu, ginv, gb, _, _ = _backward(M, W, offsets, mu, inv, b, has_e=True, L=L, gL=gL.contiguous())
        return gM, gW, None, gmu, ginv, gb


def _backward(M, W, offsets, mu, inv, b, *, has_e, c=None, a=None, shift=None, gS=None, L=None, gL=None):
    """Run backward_kernel for FusedMoments (gS given) or FusedLSE (gL given).
    -> gM, gW, gmu, ginv, gb, gc, ga (gc, ga zero for FusedLSE)."""
    N, I, _ = M.shape
    O = W.shape[1]
    lse = gL is not None
    gM, gW = torch.zeros_like(M), torch.zeros_like(W)
    gmu, ginv, gb = torch.zeros_like(mu), torch.zeros_like(inv), torch.zeros_like(b)
    gc, ga = M.new_zeros(N, I), M.new_zeros(N, I)
    bn, bo = _blocks(N, O, I)[:2]

    def given(x):  # a valid pointer for arguments the chosen mode never reads
        return x if x is not None else M

    K.backward_kernel[(triton.cdiv(N, bn), triton.cdiv(O, bo))](
        M,
        W,
        given(offsets),
        mu,
        inv,
        b,
        given(c),
        given(a),
        given(shift),
        given(L),
        *(gS if not lse else (M, M, M)),
        given(gL),
        gM,
        gW,
        gmu,
        ginv,
        gb,
        gc,
        ga,
        N,
        I,
        O,
        HAS_C=offsets is not None,
        HAS_E=has_e,
        LSE=lse,
        BN=bn,
        BO=bo,
    )
    return gM, gW, gmu, ginv, gb, gc, ga


class FusedVotes(NamedTuple):
    """The votes V_noi = M_ni W_io + offsets_i as their factors, for the fused kernels (float32, contiguous)."""

    M: torch.Tensor  # (N', I, 16) child poses
    W: torch.Tensor  # (I, O, 16) each child's transforms
    offsets: torch.Tensor | None  # (I, 16) or None

    def moments(self, terms: EStepTerms | None, c: torch.Tensor, a_scaled: torch.Tensor, shift: torch.Tensor):
        """S0 (N', O), S1, S2 (N', O, P): sum_i Ra, sum_i Ra (V - shift), sum_i Ra (V - shift)^2, with
        log R = x - log_z from `terms` and c = -log_z (N', I), or log R = c when terms is None (the first M-step)."""
        return FusedMoments.apply(*self, *(terms or (None, None, None)), c, a_scaled, shift)

    def log_sum_exp(self, terms: EStepTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """L (N', I) = logsumexp_o x_noi, and X (N', I) = sum_o softmax_o(x) x (no gradient)."""
        return FusedLSE.apply(*self, *terms)

    def centre(self, a_in: torch.Tensor) -> torch.Tensor:
        """The a_in-weighted mean vote of each (problem, parent), (N', O, 16), as routing.route's centre, without
        the votes: V is linear in M, so sum_i w_ni M_ni W_io is one product (N' 4, I 4) @ (I 4, O 4). No gradient."""
        M, W, offsets = self
        with torch.no_grad():
            N, I, _ = M.shape
            O = W.shape[1]
            total = a_in.sum(dim=1, keepdim=True)  # (N', 1)
            weights = torch.where(total > 0, a_in / total.clamp_min(1e-30), 1.0 / I)  # (N', I)
            Mw = (M * weights.unsqueeze(-1)).view(N, I, 4, 4).transpose(1, 2).reshape(N * 4, I * 4)  # [n r, i c]
            Wi = W.view(I, O, 4, 4).permute(0, 2, 1, 3).reshape(I * 4, O * 4)  # [i c, o d]
            centre = (Mw @ Wi).view(N, 4, O, 4).permute(0, 2, 1, 3).reshape(N, O, P)
            if offsets is not None:
                centre = centre + (weights @ offsets).unsqueeze(1)
            return centre


def m_step(
    votes: FusedVotes,
    terms: EStepTerms | None,
    c: torch.Tensor,
    a_scaled: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    lam: float,
    settings: RoutingSettings,
    mu_before: torch.Tensor | None,
    shift: torch.Tensor,
) -> Parents:
    """routing.m_step with the assignments rebuilt in the kernel from the last E-step's `terms` and c = -log_z
    (N', I) (or log R = c, the initial assignments, when terms is None). a_scaled (N', I) child activations times
    the data scale (pitfall 2); mu_before (N', O, P) or None; shift (N', O, P) the origin of the sums. The
    parents' means are absolute (the kernels rebuild absolute votes)."""
    S0, S1, S2 = votes.moments(terms, c, a_scaled, shift)
    before = None if mu_before is None else mu_before - shift
    parents = parents_from_moments(S0, S1, S2, beta_u, beta_a, lam, settings, before)
    return parents._replace(mu=parents.mu + shift)


def e_step(
    votes: FusedVotes, parents: Parents, combine: Callable[[torch.Tensor], torch.Tensor], temperature: float
) -> tuple[EStepTerms, torch.Tensor, torch.Tensor]:
    """routing.e_step: log R_noi = x_noi - log_z_ni with x = log p / T + log a_j, kept as its terms.

    Returns the terms, c = -log_z (N', I) and the assignment entropy sum_o -R log R per (problem, child) (N', I),
    no gradient: with R = exp(x - log_z), it is exp(L - log_z) (log_z - X).
    """
    mu, sigma_sq, log_sigma_sq, logit = parents
    inv = 1.0 / (sigma_sq * temperature)
    log_p0 = -0.5 * log_sigma_sq.sum(-1) - 0.5 * P * LOG_2PI  # (N', O): log p without the distance term
    # log a_j by logsigmoid: finite even where a_j underflows
    terms = EStepTerms(mu.contiguous(), inv.contiguous(), (log_p0 / temperature + F.logsigmoid(logit)).contiguous())
    L, X = votes.log_sum_exp(terms)
    log_z = combine(L)  # (N', I)
    with torch.no_grad():
        entropy = torch.exp(L - log_z) * (log_z - X)
    return terms, (-log_z).contiguous(), entropy


class FusedResult(NamedTuple):
    """poses (N', O, P), a_out (N', O), entropy (N', I): sum over parents of -R log R per (problem, child) for
    the last M-step's assignments (no gradient)."""

    poses: torch.Tensor
    a_out: torch.Tensor
    entropy: torch.Tensor


def fused_route(
    M: torch.Tensor,
    W: torch.Tensor,
    offsets: torch.Tensor | None,
    a_in: torch.Tensor,
    beta_u: torch.Tensor,
    beta_a: torch.Tensor,
    log_R0: torch.Tensor,
    combine: Callable[[torch.Tensor], torch.Tensor],
    settings: RoutingSettings,
) -> FusedResult:
    """routing.route from child poses and transforms, in float32 whatever the autocast state.

    M (N', I, 16), W (I, O, 16), offsets (I, 16) or None, a_in (N', I), beta_u, beta_a (O,); log_R0 (N', I):
    each child's initial log assignment to each of its parents (the same for every parent); `combine` maps
    per-window log-sum-exps (N', I) to each child's log normaliser (N', I) (pitfall 3). Every setting but
    class_lambda_scale applies (CapsNet gives the class layer its scaled final_lambda), as in routing.route.
    """
    with torch.autocast(device_type=M.device.type, enabled=False):
        votes = FusedVotes(
            M.float().contiguous(),
            W.float().contiguous(),
            offsets.float().contiguous() if offsets is not None else None,
        )
        a_in, c = a_in.float().contiguous(), log_R0.float().contiguous()
        N, I, _ = votes.M.shape
        O = votes.W.shape[1]
        a_scaled = (a_in * (DATA_SCALE * O / I)).contiguous()  # pitfall 2
        beta_a = beta_a * settings.beta_a_scale
        shift = votes.centre(a_in)
        terms, parents = None, None
        with torch.no_grad():  # of the initial assignments: O parents at exp(log_R0) each
            entropy = -O * torch.exp(c) * c
        lambdas = inverse_temperatures(settings.iterations, settings.final_lambda)
        for t, lam in enumerate(lambdas):
            mu_before = None if parents is None else parents.mu
            parents = m_step(votes, terms, c, a_scaled, beta_u, beta_a, lam, settings, mu_before, shift)
            if t < len(lambdas) - 1:
                terms, c, entropy = e_step(votes, parents, combine, settings.estep_temperature)
                shift = parents.mu.detach().contiguous()
    return FusedResult(parents.mu, torch.sigmoid(parents.logit), entropy)
