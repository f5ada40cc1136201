"""ConvCaps windows (capsdist/model/windows.py): the strided-view gather and the one-kernel scatters agree with
F.unfold / F.fold and with a brute-force max."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capsdist.model.windows import WindowGrid


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, (5, 5)), (3, 2, (7, 7)), (3, 2, (6, 5)), (1, 1, (3, 4))])
def test_windows_match_unfold_fold_and_max(kernel, stride, size):
    g = torch.Generator().manual_seed(0)
    grid = WindowGrid(kernel, stride, size, torch.device("cpu"))
    x = torch.randn(2, 3, *size, generator=g)
    cols = grid.unfold(x)  # (N, C, KK, L)
    expected = F.unfold(x, kernel, stride=stride).view(2, 3, kernel * kernel, -1)
    torch.testing.assert_close(cols, expected, rtol=0, atol=0)
    assert cols.shape[-1] == grid.out[0] * grid.out[1]
    w = torch.randn(cols.shape, generator=g)
    torch.testing.assert_close(grid.fold(w), F.fold(w.reshape(2, -1, cols.shape[-1]), size, kernel, stride=stride))
    brute = torch.full((2, 3, *size), float("-inf"))
    for k in range(kernel * kernel):
        for pos in range(cols.shape[-1]):
            r = (pos // grid.out[1]) * stride + k // kernel
            c = (pos % grid.out[1]) * stride + k % kernel
            brute[:, :, r, c] = torch.maximum(brute[:, :, r, c], w[:, :, k, pos])
    torch.testing.assert_close(grid.fold_max(w), brute, rtol=0, atol=0)
