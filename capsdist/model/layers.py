"""Capsule layers: ReLUConv -> PrimaryCaps -> ConvCaps (repeatable) -> ClassCaps.

Capsule layout, everywhere in capsdist:
    poses        (N, T, 16, H, W)   T capsule types, a 4x4 pose matrix flattened row-major, channels first
    activations  (N, T, H, W)
A routing layer hands routing.route its votes as their factors (routing.VoteFactors: child poses, transforms,
offsets), child activations (N', I) and the E-step normaliser, where N' = N * parent positions and I = children
per routing problem; model.routing_impl picks the votes backend (`CapsuleLayer.vote_backend`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from capsdist.core.errors import ConfigError
from capsdist.model.materialised_votes import MaterialisedVotes
from capsdist.model.routing import P, RoutingResult, RoutingSettings, VoteFactors, fully_connected, route, routing_dtype
from capsdist.model.windows import WindowGrid

# EM routing's vote backends (model.routing_impl): torch (materialised_votes.py: computes and keeps the votes),
# triton and c (fused_votes.py: rebuild them in registers or caches; the kernels in Triton for CUDA, or Triton's
# interpreter for tests, and in C for the CPU, fused_cpu.py). auto: c on the CPU, faster on every preset
# (docs/benchmarks.md); on CUDA torch until tests/gpu/check.sh has passed on a GPU (configs/README.md), then
# AUTO_FUSED becomes True: triton.
ROUTING_IMPLS = ("auto", "torch", "triton", "c")
AUTO_FUSED = False


@functools.lru_cache(maxsize=1)
def _c_kernels_unavailable() -> str | None:
    """Why the C kernels (fused_cpu.py) cannot run here, or None: compiled at most once per process."""
    from capsdist.model.fused_cpu import available

    return available()


@functools.lru_cache(maxsize=None)
def _warn_c_fallback(reason: str) -> None:
    """auto on the CPU without the C kernels: said once per reason (the cache remembers it was said)."""
    warnings.warn(f"EM routing on the CPU falls back to the slower torch path: {reason}", stacklevel=4)


def _c_kernels_here() -> bool:
    """auto on the CPU: the C kernels where they compile; else torch, with a warning."""
    reason = _c_kernels_unavailable()
    if reason:
        _warn_c_fallback(reason)
    return reason is None


# 4x4 transforms, initialised as in Gritzman's code: a vote is about twice its pose in scale, which offsets the
# shrinking of poses by routing's weighted means, so log sigma stays level with depth and class activations
# start unsaturated (docs/results.md).
WEIGHT_STD = 1.0


DEAD_BELOW = 0.01  # a capsule whose activation stays below this on every image of the batch is dead
SATURATED_ABOVE = 0.99  # an activation above this is saturated: the logistic is flat there


def activation_stats(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Health of one layer's activations a (N, capsules) in (0, 1), capsules = types x positions:
    mean activation, fraction of dead capsules (below DEAD_BELOW on every image) and fraction of saturated
    activations (above SATURATED_ABOVE). Scalar tensors, no host synchronisation."""
    return {
        "mean_activation": a.mean(),
        "dead_fraction": (a.amax(dim=0) < DEAD_BELOW).float().mean(),
        "saturated_fraction": (a > SATURATED_ABOVE).float().mean(),
    }


class CapsuleLayer(nn.Module):
    """Base of the routing layers: owns beta_u, beta_a (O,), runs routing, keeps cheap routing statistics.

    Subclasses define route_capsules(poses, activations): their votes and routing for a batch of images.
    `routing` holds the EM settings; with `routing_checkpoint`, images are routed in chunks and recomputed in backward;
    `routing_impl` (ROUTING_IMPLS) picks the torch or the fused Triton routing (`uses_fused`).
    """

    def __init__(
        self, out_types: int, routing: RoutingSettings, routing_checkpoint: bool = False, routing_impl: str = "auto"
    ):
        super().__init__()
        if routing_impl not in ROUTING_IMPLS:
            raise ValueError(f"routing_impl must be one of {ROUTING_IMPLS}, got {routing_impl!r}")
        self.out_types = out_types
        self.routing, self.routing_checkpoint, self.routing_impl = routing, routing_checkpoint, routing_impl
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))
        self.last_stats: dict[str, torch.Tensor] = {}

    CHECKPOINT_CHUNKS = 3  # with routing_checkpoint, images are routed in this many chunks, one at a time

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """poses (N, T, 16, H, W), activations (N, T, H, W) -> this layer's poses and activations.

        With routing_checkpoint, the votes and routing of each chunk of images are computed, used and freed,
        then recomputed in backward (torch.utils.checkpoint): only one chunk's votes are ever alive, so peak
        memory falls about CHECKPOINT_CHUNKS-fold for about one extra forward. Images route independently,
        so the result is the same as routing the whole batch at once.
        """
        if not (self.routing_checkpoint and torch.is_grad_enabled()):
            return self.route_capsules(poses, activations)
        size = -(-poses.shape[0] // self.CHECKPOINT_CHUNKS)
        outputs = [
            checkpoint(self.route_capsules, p, a, use_reentrant=False)
            for p, a in zip(poses.split(size), activations.split(size))
        ]
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def extra_repr(self) -> str:
        return f"{self.routing}, routing_checkpoint={self.routing_checkpoint}, routing_impl={self.routing_impl}"

    def resolved_impl(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """The votes backend routing_impl picks for votes of `dtype` on `device`: "torch", "triton" or "c".

        auto: torch for float64 (the fused kernels compute in float32); else c on the CPU where the C kernels compile
        (else torch, with a warning) and torch.compile is not tracing (it cannot trace their calls), triton on CUDA
        once AUTO_FUSED, else torch. triton: CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1 before
        Triton is imported), for tests. c: the CPU only.
        """
        impl = self.routing_impl
        if impl == "auto":
            if routing_dtype(dtype) == torch.float64:
                return "torch"
            if device.type == "cpu":
                return "c" if not torch.compiler.is_compiling() and _c_kernels_here() else "torch"
            return "triton" if AUTO_FUSED and device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
        if impl == "triton" and device.type != "cuda":
            from capsdist.model.fused_votes import interpreter_enabled

            if not interpreter_enabled():
                raise ConfigError(
                    "model.routing_impl: triton runs on CUDA devices (on the CPU only under TRITON_INTERPRET=1, "
                    "for tests); use auto or torch here"
                )
        if impl == "c":
            if device.type != "cpu":
                raise ConfigError(f"model.routing_impl: c runs on the CPU, not {device.type}; use auto or torch")
            reason = _c_kernels_unavailable()
            if reason:
                raise ConfigError(f"model.routing_impl: c cannot run here: {reason}")
        return impl

    def vote_backend(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Callable[..., Any]:
        """from_factors(factors, normaliser) of the votes backend (routing.Votes) routing_impl picks (resolved_impl)."""
        impl = self.resolved_impl(device, dtype)
        if impl == "torch":
            return MaterialisedVotes.from_factors
        from capsdist.model import fused_votes  # imports Triton where it is installed: only when a fused path runs

        if impl == "triton":
            return functools.partial(fused_votes.FusedVotes.from_factors, kernels=fused_votes.TritonKernels())
        from capsdist.model.fused_cpu import CKernels

        return functools.partial(fused_votes.FusedVotes.from_factors, kernels=CKernels())

    def _route(self, factors: VoteFactors, a_in: torch.Tensor, log_R0: torch.Tensor, normaliser) -> RoutingResult:
        """The votes' factors, a_in and log_R0 (N', I), and the E-step normaliser (routing.Normaliser) ->
        RoutingResult, on the backend routing_impl picks."""
        votes = self.vote_backend(factors.M.device, factors.M.dtype)(factors, normaliser)
        return route(votes, a_in, self.beta_u, self.beta_a, log_R0, self.routing)

    def _record(self, a_out: torch.Tensor, images: int, entropy_per_child: torch.Tensor) -> None:
        """Keep detached statistics of the last forward (tensors: read on the host only when logged).

        a_out (N', O) with N' = images * parent positions; entropy_per_child: assignment entropy (nats) of
        every child. See `activation_stats` for the activation statistics.
        """
        self.last_stats = {
            **activation_stats(a_out.detach().reshape(images, -1)),
            "assignment_entropy": entropy_per_child.detach().mean(),
        }


class ReLUConv(nn.Module):
    """First layer: a convolution with ReLU (the paper), then `extra_convs` 3x3 "same" convolutions with ReLU;
    with `norm`, BatchNorm between each convolution and its ReLU. (N, C, H, W) -> (N, A, H', W').

    With `pool`, the first convolution runs at stride 1 and a `stride` x `stride` max-pool follows its ReLU (the
    CNN baselines' way), so the grid has the same size for the even input sizes of the datasets (28, 32); its
    receptive fields are one pixel wider. `kernel` and `stride` describe the whole layer's windows, for the
    receptive-field centres. The extra convolutions keep the size and those centres.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel: int = 5,
        stride: int = 2,
        extra_convs: int = 0,
        norm: bool = False,
        pool: bool = False,
    ):
        super().__init__()
        self.pool = stride if pool else 0
        self.kernel, self.stride = kernel, stride
        if pool:
            self.kernel += stride - 1  # the max-pool widens each window by stride - 1 pixels
        self.conv = nn.Conv2d(in_channels, channels, kernel, 1 if pool else stride)
        self.extra = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(extra_convs))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(1 + extra_convs)) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate([self.conv, *self.extra]):
            x = conv(x)
            x = F.relu(self.norms[i](x) if self.norms is not None else x)
            if i == 0 and self.pool:
                x = F.max_pool2d(x, self.pool)
        return x


class PrimaryCaps(nn.Module):
    """1x1 convolution to B capsule types: a 4x4 pose and a logistic activation each.

    (N, A, H, W) -> poses (N, B, 16, H, W), activations (N, B, H, W).
    """

    kernel, stride = 1, 1

    def __init__(self, in_channels: int, types: int):
        super().__init__()
        self.types = types
        self.last_stats: dict[str, torch.Tensor] = {}
        self.pose = nn.Conv2d(in_channels, types * P, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        poses = self.pose(x).view(n, self.types, P, h, w)  # (N, B, 16, H, W)
        activations = torch.sigmoid(self.activation(x))  # (N, B, H, W)
        self.last_stats = activation_stats(activations.detach().reshape(n, -1))
        return poses, activations


class ConvCaps(CapsuleLayer):
    """Convolutional capsules: routing over K x K windows with a stride, one learned 4x4 transform per
    (kernel position, input type, output type).

    poses (N, T, 16, H, W), activations (N, T, H, W) -> poses (N, O, 16, H', W'), activations (N, O, H', W'),
    H' = (H - K) // stride + 1. Each parent position is a routing problem with I = K * K * T children.
    Gritzman's pitfall 3: a child sits in several windows; the E-step normalises its assignments over every
    parent of every window that holds it (a fold of the per-window sums back onto the child grid), and the
    initial assignments are uniform over that whole set. The windows are gathered and folded by windows.WindowGrid
    (one copy or one scatter each, not F.unfold / F.fold's im2col / col2im per image).
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel: int,
        stride: int,
        routing: RoutingSettings,
        routing_checkpoint: bool = False,
        routing_impl: str = "auto",
    ):
        super().__init__(out_types, routing, routing_checkpoint, routing_impl)
        self.in_types, self.kernel, self.stride = in_types, kernel, stride
        self.weight = nn.Parameter(torch.randn(kernel * kernel, in_types, out_types, 4, 4) * WEIGHT_STD)

    def output_size(self, size: int) -> int:
        return (size - self.kernel) // self.stride + 1

    def grid(self, h: int, w: int, device: torch.device) -> WindowGrid:
        """The layer's windows over an H x W child grid."""
        if min(self.output_size(h), self.output_size(w)) < 1:
            raise ValueError(
                f"ConvCaps with kernel {self.kernel} needs an input of at least {self.kernel}x"
                f"{self.kernel}, got {h}x{w}: use a larger input size or fewer layers"
            )
        return WindowGrid(self.kernel, self.stride, (h, w), device)

    def _to_routing(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, K*K, L) -> (N * L, K*K * T): per parent position, children ordered (kernel position, type)."""
        n, t, kk, l = x.shape
        return x.permute(0, 3, 2, 1).reshape(n * l, kk * t)

    def _from_routing(self, x: torch.Tensor, n: int, o: int) -> torch.Tensor:
        """(N * L, O, K*K * T) -> (N, T, K*K, L) with O summed out (used for per-child sums over parents)."""
        nl = x.shape[0]
        kk = self.kernel * self.kernel
        return x.sum(1).view(n, nl // n, kk, -1).permute(0, 3, 2, 1)

    def factors(self, poses: torch.Tensor, grid: WindowGrid) -> VoteFactors:
        """poses (N, T, 16, H, W) -> the votes' factors: M (K*K * T, N * L, 1, 16), one group per kernel position
        and type, gathered from a strided view of the poses by one copy, and W (K*K * T, O, 4, 4)."""
        n, t, _, h, w = poses.shape
        kk = self.kernel * self.kernel
        windows = grid.patches(poses.reshape(n, t * P, h, w)).unflatten(1, (t, P))  # (N, T, 16, H', W', K, K)
        M = windows.permute(5, 6, 1, 0, 3, 4, 2).reshape(kk * t, -1, 1, P)  # (KK*T, N*L, 1, 16)
        return VoteFactors(M, self.weight.view(kk * t, self.out_types, 4, 4), None)

    def log_normaliser(self, per_window: torch.Tensor, grid: WindowGrid, n: int) -> torch.Tensor:
        """Pitfall 3: per-window log-sum-exps over parents (N', I) -> each child's log-sum-exp over every parent of
        every window that holds it, (N', I) in the same layout."""
        windows = self._from_routing(per_window.unsqueeze(1), n, 1)  # (N, T, KK, L)
        with torch.no_grad():
            m = grid.fold_max(windows)  # (N, T, H, W) stabiliser
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = grid.fold(torch.exp(windows - grid.unfold(m)))  # (N, T, H, W), >= 1 where covered
        log_z = torch.log(torch.where(s > 0, s, torch.ones_like(s))) + m
        return self._to_routing(grid.unfold(log_z))

    def route_capsules(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, _, h, w = poses.shape
        o = self.out_types
        grid = self.grid(h, w, poses.device)
        a_in = self._to_routing(grid.unfold(activations))  # (N', I)
        ones = torch.ones(1, 1, h, w, dtype=routing_dtype(poses.dtype), device=poses.device)
        fan_in = grid.fold(grid.unfold(ones))  # (1, 1, H, W): windows holding each child
        uniform = grid.unfold(-torch.log(fan_in.clamp_min(1.0) * o)).expand(n, t, -1, -1)  # (N, T, KK, L)
        log_R0 = self._to_routing(uniform)  # (N', I): 1 / (O * windows), the same for every parent

        normaliser = functools.partial(self.log_normaliser, grid=grid, n=n)
        result = self._route(self.factors(poses, grid), a_in, log_R0, normaliser)
        with torch.no_grad():
            ent = grid.fold(self._from_routing(result.entropy.unsqueeze(1), n, 1))  # (N, T, H, W) per child
            covered = fan_in[0, 0] > 0  # (H, W): children in at least one window
            self._record(result.a_out, n, ent[:, :, covered])
        out = grid.out
        poses_out = result.poses.view(n, out[0], out[1], o, P).permute(0, 3, 4, 1, 2)  # (N, O, 16, H', W')
        a_out = result.a_out.view(n, out[0], out[1], o).permute(0, 3, 1, 2)  # (N, O, H', W')
        return poses_out.contiguous(), a_out.contiguous()


class ClassCaps(CapsuleLayer):
    """Class capsules: one 4x4 transform per (input type, class), shared across positions, routing from every
    child at every position to the classes, with scaled coordinate addition.

    poses (N, T, 16, H, W), activations (N, T, H, W) -> class poses (N, O, 16), class activations (N, O).
    Coordinate addition: the scaled (row, column) of each child's receptive-field centre in the input image
    is added to the first two entries of the vote's last column (flat pose entries 3 and 7).
    `centre(pos)` maps a child position index to its receptive-field centre in input pixels; `input_size`
    scales it to [0, 1].
    """

    def __init__(
        self,
        in_types: int,
        classes: int,
        routing: RoutingSettings,
        coord_add: bool = True,
        routing_checkpoint: bool = False,
        routing_impl: str = "auto",
    ):
        super().__init__(classes, routing, routing_checkpoint, routing_impl)
        self.in_types, self.coord_add = in_types, coord_add
        self.weight = nn.Parameter(torch.randn(in_types, classes, 4, 4) * WEIGHT_STD)
        self.centre_scale = (1.0, 0.5)  # receptive-field centre = scale * index + offset, in input pixels
        self.input_size = 1

    def set_geometry(self, centre_scale: tuple[float, float], input_size: int) -> None:
        """Called by CapsNet: the receptive-field centre of child position j is a * j + b input pixels."""
        self.centre_scale, self.input_size = centre_scale, input_size

    def coordinates(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(H * W, 16) offsets: scaled row at pose [0, 3], scaled column at [1, 3] (flat entries 3 and 7)."""
        a, b = self.centre_scale
        rows = (a * torch.arange(h, device=device, dtype=dtype) + b) / self.input_size
        cols = (a * torch.arange(w, device=device, dtype=dtype) + b) / self.input_size
        offsets = torch.zeros(h, w, 4, 4, device=device, dtype=dtype)
        offsets[:, :, 0, 3] = rows[:, None]
        offsets[:, :, 1, 3] = cols[None, :]
        return offsets.view(h * w, P)

    def factors(self, poses: torch.Tensor) -> VoteFactors:
        """poses (N, T, 16, H, W) -> the votes' factors: M (T, N, H*W, 16), one group per type (children ordered
        type, row, column), W (T, O, 4, 4), and the coordinates (H*W, 16) as offsets with coord_add."""
        n, t, _, h, w = poses.shape
        M = poses.view(n, t, P, h * w).permute(1, 0, 3, 2)  # (T, N, HW, 16), a view
        offsets = self.coordinates(h, w, poses.device, routing_dtype(poses.dtype)) if self.coord_add else None
        return VoteFactors(M, self.weight, offsets)

    def route_capsules(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, _, h, w = poses.shape
        a_in = activations.reshape(n, t * h * w)  # (N, I), ordered (type, row, column)
        log_R0 = poses.new_full((n, t * h * w), -math.log(self.out_types), dtype=routing_dtype(poses.dtype))
        result = self._route(self.factors(poses), a_in, log_R0, fully_connected)  # log_R0: uniform over classes
        self._record(result.a_out, n, result.entropy)
        return result.poses, result.a_out
