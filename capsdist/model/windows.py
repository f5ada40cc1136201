"""The K x K windows of a convolutional capsule layer: gather and scatter with one kernel each.

F.unfold and F.fold run im2col / col2im once per image on the GPU (docs/benchmarks.md). Here the windows are
a strided view of the child grid (Tensor.unfold, no copy), so the gather into any layout is one copy, and the
sums back onto the child grid are one index_add / scatter_reduce over a precomputed index of the child under
each window entry.

Shapes: children (N, C, H, W); windows (N, C, K*K, L) with window entries ordered (kernel row, kernel column)
and parent positions L = H' * W' row-major, H' = (H - K) // stride + 1.
"""

from __future__ import annotations

import torch


class WindowGrid:
    """Windows of size `kernel` and step `stride` over an H x W child grid."""

    def __init__(self, kernel: int, stride: int, size: tuple[int, int], device: torch.device):
        self.kernel, self.stride, self.size = kernel, stride, size
        self.out = ((size[0] - kernel) // stride + 1, (size[1] - kernel) // stride + 1)
        ho, wo = self.out
        k = torch.arange(kernel, device=device)
        rows = (torch.arange(ho, device=device) * stride)[None, :] + k[:, None]  # (K, H') child row
        cols = (torch.arange(wo, device=device) * stride)[None, :] + k[:, None]  # (K, W') child column
        self.index = (rows[:, None, :, None] * size[1] + cols[None, :, None, :]).reshape(-1)  # (K*K*L,) flat child

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H', W', K, K), a strided view (no copy)."""
        k, s = self.kernel, self.stride
        return x.unfold(2, k, s).unfold(3, k, s)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, K*K, L): one copy."""
        n, c = x.shape[:2]
        return self.patches(x).permute(0, 1, 4, 5, 2, 3).reshape(n, c, self.kernel**2, -1)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, K*K, L) -> (N, C, H, W): each window entry summed onto its child (0 where no window)."""
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        return flat.new_zeros(n, c, self.size[0] * self.size[1]).index_add(2, self.index, flat).view(n, c, *self.size)

    def fold_max(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, K*K, L) -> (N, C, H, W): the max over each child's window entries (-inf where none)."""
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        grid = flat.new_full((n, c, self.size[0] * self.size[1]), float("-inf"))
        return grid.scatter_reduce(2, self.index.expand(n, c, -1), flat, "amax").view(n, c, *self.size)
