"""The votes' gradient, written once: autograd functions for the two big contractions of EM routing.

Routing touches the (large) vote tensor only through two contractions, used 2 * iterations - 1 times:
    moments = Ra @ VV      (N', O, 1, I) @ (N', O, I, 2P) -> (N', O, 1, 2P)    M-step
    dist    = VV @ coef    (N', O, I, 2P) @ (N', O, 2P, 1) -> (N', O, I, 1)    E-step
where VV = [V - c, (V - c)^2] (N', O, I, 2P) and c is a constant centre. Plain autograd would write a
VV-sized gradient for every use and add them up. Both contractions are bilinear, so the gradient of VV is a
sum of outer products: sum over uses of Ra^T g (M-step) and g coef^T (E-step). A `VoteTape` collects those
small factors while autograd walks back through the small tensors of routing, and the tape's entry node,
which autograd runs only after every use has been differentiated, turns them into the gradient of V with one
batched matmul: dV = G[..., :P] + 2 (V - c) G[..., P:] where G = sum of the outer products.

Only the first use hands its VV gradient to autograd, as a zero-stride zero tensor that carries no memory:
that alone makes autograd run the entry node, after all the others (it waits for every consumer edge).
"""

from __future__ import annotations

import torch
from torch.autograd import Function


class VoteTape:
    """Factors (left (N', O, I, k), right (N', O, k, 2P)) whose products sum to the gradient of VV."""

    def __init__(self) -> None:
        self.lefts: list[torch.Tensor] = []
        self.rights: list[torch.Tensor] = []
        self.uses = 0

    def record(self, left: torch.Tensor, right: torch.Tensor) -> None:
        self.lefts.append(left)
        self.rights.append(right)

    def first_use(self) -> bool:
        """True for the first contraction recorded in the forward pass (it carries the token gradient)."""
        self.uses += 1
        return self.uses == 1


def _token(VV: torch.Tensor) -> torch.Tensor:
    """A zero gradient of VV's shape with no storage (stride 0)."""
    return VV.new_zeros(()).expand(VV.shape)


class _Entry(Function):
    """VV = [V - c, (V - c)^2] (N', O, I, 2P) from votes V (N', O, I, P) in any strides or float dtype and a
    centre c (N', O, P); its backward turns the tape into dV with one batched matmul."""

    @staticmethod
    def forward(ctx, V, centre, tape):
        n, o, i, p = V.shape
        VV = torch.empty(n, o, i, 2 * p, dtype=centre.dtype, device=V.device)
        Vc, Vc_sq = VV[..., :p], VV[..., p:]
        torch.sub(V, centre.unsqueeze(2), out=Vc)  # reads V in whatever layout the vote matmul left it
        torch.mul(Vc, Vc, out=Vc_sq)
        ctx.tape = tape
        ctx.save_for_backward(VV)
        return VV

    @staticmethod
    def backward(ctx, _token_grad):
        (VV,) = ctx.saved_tensors
        tape, p = ctx.tape, VV.shape[-1] // 2
        if not tape.lefts:
            return None, None, None
        left, right = torch.cat(tape.lefts, dim=-1), torch.cat(tape.rights, dim=-2)  # (N', O, I, k), (N', O, k, 2P)
        tape.lefts.clear()
        tape.rights.clear()
        dV = torch.matmul(left, right[..., :p])  # (N', O, I, P)
        dV.addcmul_(VV[..., :p], torch.matmul(left, right[..., p:]), value=2.0)
        return dV, None, None  # autograd casts dV to V's dtype where they differ


class _Moments(Function):
    """moments (N', O, 2P) = sum_i Ra (N', O, I) * VV (N', O, I, 2P)."""

    @staticmethod
    def forward(ctx, VV, Ra, tape):
        ctx.tape, ctx.first = tape, tape.first_use()
        ctx.save_for_backward(VV, Ra)
        return torch.matmul(Ra.unsqueeze(2), VV).squeeze(2)

    @staticmethod
    def backward(ctx, g):
        VV, Ra = ctx.saved_tensors
        grad_Ra = torch.matmul(VV, g.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None  # (N', O, I)
        if not ctx.needs_input_grad[0]:
            return None, grad_Ra, None
        ctx.tape.record(Ra.unsqueeze(-1), g.unsqueeze(2))  # (N', O, I, 1), (N', O, 1, 2P)
        return (_token(VV) if ctx.first else None), grad_Ra, None


class _Quadratic(Function):
    """dist (N', O, I) = sum_k VV (N', O, I, 2P) * coef (N', O, 2P)."""

    @staticmethod
    def forward(ctx, VV, coef, tape):
        ctx.tape, ctx.first = tape, tape.first_use()
        ctx.save_for_backward(VV, coef)
        return torch.matmul(coef.unsqueeze(2), VV.transpose(-1, -2)).squeeze(2)  # faster than VV @ coef on the CPU

    @staticmethod
    def backward(ctx, g):
        VV, coef = ctx.saved_tensors
        grad_coef = torch.matmul(g.unsqueeze(2), VV).squeeze(2) if ctx.needs_input_grad[1] else None  # (N', O, 2P)
        if not ctx.needs_input_grad[0]:
            return None, grad_coef, None
        ctx.tape.record(g.unsqueeze(-1), coef.unsqueeze(2))  # (N', O, I, 1), (N', O, 1, 2P)
        return (_token(VV) if ctx.first else None), grad_coef, None


class TapedVotes:
    """VV of a routing call and its two contractions, with the fused gradient. Use one per routing call."""

    def __init__(self, V: torch.Tensor, centre: torch.Tensor):
        self.tape = VoteTape()
        self.VV = _Entry.apply(V, centre, self.tape)  # (N', O, I, 2P)

    def moments(self, Ra: torch.Tensor) -> torch.Tensor:
        """Ra (N', O, I) -> (N', O, 2P): [sum_i Ra (V - c), sum_i Ra (V - c)^2]."""
        return _Moments.apply(self.VV, Ra, self.tape)

    def quadratic(self, coef: torch.Tensor) -> torch.Tensor:
        """coef (N', O, 2P) -> (N', O, I): sum over the 2P entries of VV * coef."""
        return _Quadratic.apply(self.VV, coef, self.tape)


class PlainVotes:
    """The same contractions in plain autograd ops, for torch.compile: the tape's side effects cannot be traced,
    and inductor fuses the per-use gradients by itself."""

    def __init__(self, V: torch.Tensor, centre: torch.Tensor):
        Vc = V.to(centre.dtype) - centre.unsqueeze(2)  # (N', O, I, P)
        self.VV = torch.cat([Vc, Vc * Vc], dim=-1)  # (N', O, I, 2P)

    def moments(self, Ra: torch.Tensor) -> torch.Tensor:
        return torch.matmul(Ra.unsqueeze(2), self.VV).squeeze(2)

    def quadratic(self, coef: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.VV, coef.unsqueeze(-1)).squeeze(-1)


def routed_votes(V: torch.Tensor, centre: torch.Tensor) -> TapedVotes | PlainVotes:
    """VV and its contractions for one routing call: taped in eager mode, plain under torch.compile."""
    return PlainVotes(V, centre) if torch.compiler.is_compiling() else TapedVotes(V, centre)
