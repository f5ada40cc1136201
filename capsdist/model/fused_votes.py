"""The fused votes backend of routing.route (model.routing_impl triton): the votes never written to memory.

The votes are held as their factors (fused_kernels.py):
    M        child poses per routing problem       (N', I, 16)
    W        transforms per child and parent       (I, O, 16)   ConvCaps: one per kernel position and type;
                                                                ClassCaps: its type's, repeated over positions
    offsets  a constant added to each child's vote (I, 16) or None (ClassCaps' coordinate addition)
Each vote V_noi = M_ni W_io + offsets_i is rebuilt in registers by every kernel that needs it. Two autograd
functions wrap the kernels; the small per-parent and per-child steps between them are plain torch:
    FusedMoments  the M-step sums S0 (N', O), S1, S2 (N', O, 16) for the assignments of the last E-step
    FusedLSE      the E-step's log-sum-exp over the parents of each (problem, child), L (N', I)
The E-step normaliser (routing.Normaliser) maps L to each child's log normaliser log_z (N', I); then
log R_noi = x_noi - log_z_ni is recomputed in the next M-step's kernel from x's terms (`EStepTerms`).
The kernels take the M-step sums about the origin (`FusedVotes.centre`), as the materialised votes are centred.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd import Function

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from capsdist.model import fused_kernels as K
except ImportError:  # a CPU build of torch comes without Triton: only the C kernels run (fused_cpu.py)
    triton = None
from capsdist.model.routing import (
    LOG_2PI,
    P,
    Normaliser,
    Parents,
    VoteFactors,
    assignment_entropy,
    centre_weights,
    fully_connected,
)


class Tile(NamedTuple):
    """moments_kernel's or backward_kernel's program: BN problems x BO parents x 16 pose entries (powers of 2)."""

    n: int  # routing problems per program (BN)
    o: int  # parents per program (BO)
    warps: int  # num_warps


class LseTile(NamedTuple):
    """lse_kernel's program: every parent at once (BO = next_power_of_2(O)), BN = rows // BO problems."""

    rows: int  # problems x parents per program
    i: int  # children per program, one after another (BI)
    warps: int  # num_warps


class Blocks(NamedTuple):
    """Each kernel's tile, which lives in registers. On the GPU: the tile area the design counts on (8 x 8 problems x
    parents, lse 128), with no register spill on sm_80 and sm_90 and the most warps per SM among the candidates
    (docs/benchmarks.md, tests/gpu/kernels.py). The interpreter runs programs one after another, so there
    fewer, larger tiles are faster."""

    moments: Tile
    lse: LseTile
    backward: Tile


GPU_BLOCKS = Blocks(moments=Tile(8, 8, 8), lse=LseTile(128, 16, 8), backward=Tile(8, 8, 8))
INTERPRETER_BLOCKS = Blocks(moments=Tile(64, 32, 4), lse=LseTile(2048, 64, 4), backward=Tile(64, 32, 4))


class Launch(NamedTuple):
    """One kernel launch: its grid, constexpr arguments and num_warps."""

    grid: tuple[int, int]
    constexprs: dict
    warps: int


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 at import): CPU tensors work."""
    return triton is not None and isinstance(K.moments_kernel, InterpretedFunction)


def _blocks() -> Blocks:
    return INTERPRETER_BLOCKS if interpreter_enabled() else GPU_BLOCKS


def _problems_by_parents(tile: Tile, N: int, O: int, **flags) -> Launch:
    """A launch over (N / BN, O / BO) programs, the tile clamped to N problems and O parents."""
    bn, bo = min(tile.n, triton.next_power_of_2(N)), min(tile.o, triton.next_power_of_2(O))
    return Launch((triton.cdiv(N, bn), triton.cdiv(O, bo)), dict(**flags, BN=bn, BO=bo), tile.warps)


def moments_launch(N: int, I: int, O: int, *, has_c: bool, has_e: bool) -> Launch:
    """moments_kernel for N problems, I children, O parents, with coordinates (offsets) and E-step terms or not."""
    return _problems_by_parents(_blocks().moments, N, O, HAS_C=has_c, HAS_E=has_e)


def lse_launch(N: int, I: int, O: int, *, has_c: bool) -> Launch:
    """lse_kernel for N problems, I children, O parents, with coordinates or not."""
    tile = _blocks().lse
    bo = triton.next_power_of_2(O)
    bn, bi = max(1, min(tile.rows // bo, triton.next_power_of_2(N))), min(tile.i, I)
    return Launch((triton.cdiv(N, bn), triton.cdiv(I, bi)), dict(HAS_C=has_c, BN=bn, BO=bo, BI=bi), tile.warps)


def backward_launch(N: int, I: int, O: int, *, has_c: bool, has_e: bool, lse: bool) -> Launch:
    """backward_kernel of moments_kernel (lse false) or of lse_kernel (lse true, has_e true)."""
    return _problems_by_parents(_blocks().backward, N, O, HAS_C=has_c, HAS_E=has_e, LSE=lse)


class EStepTerms(NamedTuple):
    """An E-step's terms per parent, from which the kernels rebuild x_noi = b_no - 1/2 sum_h (V_noih - mu_noh)^2
    inv_noh, the E-step logit of child i for parent o (log p / T + log a_o, as MaterialisedVotes.e_step's)."""

    mu: torch.Tensor  # (N', O, P) parent means
    inv: torch.Tensor  # (N', O, P) 1 / (sigma_sq T)
    b: torch.Tensor  # (N', O) (-1/2 sum_h log sigma_sq_h - P/2 log 2 pi) / T + log a_o


class TritonKernels:
    """The three kernels of fused_kernels.py, launched by Triton (CUDA, or its interpreter on the CPU for tests), on
    the tensors FusedMoments and FusedLSE hand them: float32, contiguous."""

    def moments(self, M, W, offsets, e, c, a, shift):
        """-> S0 (N', O), S1, S2 (N', O, 16); e = (mu, inv, b) or None (no E-step terms)."""
        N, I, _ = M.shape
        O = W.shape[1]
        S0 = M.new_empty(N, O)
        S1, S2 = M.new_empty(N, O, P), M.new_empty(N, O, P)
        launch = moments_launch(N, I, O, has_c=offsets is not None, has_e=e is not None)
        K.moments_kernel[launch.grid](
            M,
            W,
            offsets if offsets is not None else M,
            *(e if e is not None else (shift, shift, shift)),  # unused pointers without E-step terms
            c,
            a,
            shift,
            S0,
            S1,
            S2,
            N,
            I,
            O,
            **launch.constexprs,
            num_warps=launch.warps,
        )
        return S0, S1, S2

    def lse(self, M, W, offsets, mu, inv, b):
        """-> L, X (N', I)."""
        N, I, _ = M.shape
        O = W.shape[1]
        L, X = M.new_empty(N, I), M.new_empty(N, I)
        launch = lse_launch(N, I, O, has_c=offsets is not None)
        K.lse_kernel[launch.grid](
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
            **launch.constexprs,
            num_warps=launch.warps,
        )
        return L, X

    def backward(self, M, W, offsets, mu, inv, b, *, has_e, c=None, a=None, shift=None, gS=None, L=None, gL=None):
        """The gradients of moments (gS given) or of lse's L (gL given).
        -> gM, gW, gmu, ginv, gb, gc, ga (gc, ga zero for lse)."""
        N, I, _ = M.shape
        O = W.shape[1]
        lse = gL is not None
        gM, gW = torch.zeros_like(M), torch.zeros_like(W)
        gmu, ginv, gb = torch.zeros_like(mu), torch.zeros_like(inv), torch.zeros_like(b)
        gc, ga = M.new_zeros(N, I), M.new_zeros(N, I)
        launch = backward_launch(N, I, O, has_c=offsets is not None, has_e=has_e, lse=lse)

        def given(x):  # a valid pointer for arguments the chosen mode never reads
            return x if x is not None else M

        K.backward_kernel[launch.grid](
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
            **launch.constexprs,
            num_warps=launch.warps,
        )
        return gM, gW, gmu, ginv, gb, gc, ga


class FusedMoments(Function):
    """(kernels, M, W, offsets, mu, inv, b, c, a, shift) -> S0 (N', O), S1, S2 (N', O, 16).

    log R_noi = c_ni (+ x_noi when mu is not None); Ra = exp(log R) a_ni;
    S0 = sum_i Ra, S1 = sum_i Ra (V - shift), S2 = sum_i Ra (V - shift)^2.
    """

    @staticmethod
    def forward(ctx, kernels, M, W, offsets, mu, inv, b, c, a, shift):
        has_e = mu is not None
        e = (mu, inv, b) if has_e else (shift, shift, shift)  # placeholders the backward ignores without E-step terms
        S0, S1, S2 = kernels.moments(M, W, offsets, e if has_e else None, c, a, shift)
        ctx.save_for_backward(M, W, offsets, *e, c, a, shift)
        ctx.has_e, ctx.kernels = has_e, kernels
        return S0, S1, S2

    @staticmethod
    def backward(ctx, gS0, gS1, gS2):
        M, W, offsets, mu, inv, b, c, a, shift = ctx.saved_tensors
        gS = (gS0.contiguous(), gS1.contiguous(), gS2.contiguous())
        gM, gW, gmu, ginv, gb, gc, ga = ctx.kernels.backward(
            M, W, offsets, mu, inv, b, has_e=ctx.has_e, c=c, a=a, shift=shift, gS=gS
        )
        if not ctx.has_e:
            gmu = ginv = gb = None
        return None, gM, gW, None, gmu, ginv, gb, gc, ga, None


class FusedLSE(Function):
    """(kernels, M, W, offsets, mu, inv, b) -> L (N', I) = logsumexp over o of x_noi, and X (N', I) = the
    softmax-weighted mean of x over o (no gradient; for the assignment entropy)."""

    @staticmethod
    def forward(ctx, kernels, M, W, offsets, mu, inv, b):
        L, X = kernels.lse(M, W, offsets, mu, inv, b)
        ctx.save_for_backward(M, W, offsets, mu, inv, b, L)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(X)
        return L, X

    @staticmethod
    def backward(ctx, gL, _gX):
        M, W, offsets, mu, inv, b, L = ctx.saved_tensors
        gM, gW, gmu, ginv, gb, _, _ = ctx.kernels.backward(
            M, W, offsets, mu, inv, b, has_e=True, L=L, gL=gL.contiguous()
        )
        return None, gM, gW, None, gmu, ginv, gb


class FusedAssignments(NamedTuple):
    """Assignments as the kernels rebuild them: log R_noi = c_ni (+ x_noi from `terms`, after an E-step)."""

    terms: EStepTerms | None  # None for the initial assignments
    c: torch.Tensor  # (N', I): log R0, or -log_z after an E-step


class FusedVotes:
    """routing.Votes as their factors M (N', I, 16), W (I, O, 16), offsets (I, 16) or None (float32,
    contiguous), for `kernels` (TritonKernels, or fused_cpu.CKernels); `normaliser` as routing.Normaliser."""

    dtype = torch.float32

    def __init__(self, M: torch.Tensor, W: torch.Tensor, offsets: torch.Tensor | None, normaliser: Normaliser, kernels):
        self.M, self.W, self.offsets, self.normaliser, self.kernels = M, W, offsets, normaliser, kernels
        self.children, self.parents = W.shape[:2]

    @classmethod
    def from_factors(cls, factors: VoteFactors, normaliser: Normaliser = fully_connected, *, kernels) -> "FusedVotes":
        """The kernels' layout of `factors`: one copy of M, W and offsets repeated over each group's children."""
        M, W, offsets = factors
        G, N, C, _ = M.shape
        O = W.shape[1]
        M = M.transpose(0, 1).reshape(N, G * C, P)  # (N', I, 16), children ordered (group, c)
        W = W.reshape(G, 1, O, P).expand(G, C, O, P).reshape(G * C, O, P)  # (I, O, 16)
        if offsets is not None:
            offsets = offsets.expand(G, C, P).reshape(G * C, P).float().contiguous()  # (I, 16)
        return cls(M.float().contiguous(), W.float().contiguous(), offsets, normaliser, kernels)

    def centre(self, a_in: torch.Tensor) -> torch.Tensor:
        """The a_in-weighted mean vote (N', O, 16) without the votes: V is linear in M, so sum_i w_ni M_ni W_io is
        one product (N' 4, I 4) @ (I 4, O 4). No gradient."""
        M, W, offsets = self.M, self.W, self.offsets
        with torch.no_grad():
            N, I, _ = M.shape
            O = W.shape[1]
            weights = centre_weights(a_in)  # (N', I)
            Mw = (M * weights.unsqueeze(-1)).view(N, I, 4, 4).transpose(1, 2).reshape(N * 4, I * 4)  # [n r, i c]
            Wi = W.view(I, O, 4, 4).permute(0, 2, 1, 3).reshape(I * 4, O * 4)  # [i c, o d]
            centre = (Mw @ Wi).view(N, 4, O, 4).permute(0, 2, 1, 3).reshape(N, O, P)
            if offsets is not None:
                centre = centre + (weights @ offsets).unsqueeze(1)
        self.origin = centre.contiguous()
        return self.origin

    def start(self, log_R0: torch.Tensor) -> FusedAssignments:
        return FusedAssignments(None, log_R0.contiguous())

    def moments(self, assignments: FusedAssignments, a_scaled: torch.Tensor):
        """S0 (N', O), S1, S2 (N', O, P): sum_i Ra, sum_i Ra (V - origin), sum_i Ra (V - origin)^2."""
        terms, c = assignments
        e = terms or (None, None, None)
        return FusedMoments.apply(self.kernels, self.M, self.W, self.offsets, *e, c, a_scaled.contiguous(), self.origin)

    def e_step(self, parents: Parents, temperature: float) -> tuple[FusedAssignments, torch.Tensor]:
        """log R_noi = x_noi - log_z_ni with x = log p / T + log a_j, kept as its terms, and its entropy (N', I)."""
        mu, sigma_sq, log_sigma_sq, logit = parents
        inv = 1.0 / (sigma_sq * temperature)
        log_p0 = -0.5 * log_sigma_sq.sum(-1) - 0.5 * P * LOG_2PI  # (N', O): log p without the distance term
        # log a_j by logsigmoid: finite even where a_j underflows
        b = log_p0 / temperature + F.logsigmoid(logit)
        terms = EStepTerms((mu + self.origin).contiguous(), inv.contiguous(), b.contiguous())
        L, X = FusedLSE.apply(self.kernels, self.M, self.W, self.offsets, *terms)  # (N', I) each
        log_z = self.normaliser(L)  # (N', I), pitfall 3
        return FusedAssignments(terms, (-log_z).contiguous()), assignment_entropy(L, log_z, X)
