"""The fused routing kernels on the CPU (model.routing_impl c): fused_cpu.c, compiled once per machine, run on threads.

The C source is compiled by the system's C compiler (`CC`, else cc) with -O3 -march=native into a shared library
under the kernel cache (`CAPSDIST_KERNEL_CACHE`, else ~/.cache/capsdist/kernels), named by a hash of the source,
the flags, the compiler and the CPU's feature flags, so a cluster of mixed machines sharing a home directory gets
one library per kind of CPU. The library is written to a temporary name and renamed: concurrent processes that
compile at once each get a whole library. The kernels run on torch's OpenMP threads (fused_cpu.c), as many as
torch's intra-op threads, which the CPU share sets; the problems go in fixed chunks, so every sum is the same
whatever the thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from capsdist.model.routing import P

SOURCE = Path(__file__).with_name("fused_cpu.c")
FLAGS = (
    "-fopenmp",
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-std=c11",
    "-fPIC",
    "-shared",
)
CHUNKS = 16  # problems are cut into at most this many chunks, whatever the thread count (fixed sums)


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here; the message says why."""


def _cache_dir() -> Path:
    return Path(os.environ.get("CAPSDIST_KERNEL_CACHE") or Path.home() / ".cache" / "capsdist" / "kernels")


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native compiles for them), or the machine name where /proc has none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def compiler() -> str | None:
    """The C compiler the kernels are built with: `CC`, else cc or gcc on the PATH; None where there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled kernels, built on first use. Raises KernelBuildError (no compiler, or it failed)."""
    cc = compiler()
    if not cc:
        raise KernelBuildError("no C compiler found (set CC or install gcc); use model.routing_impl: torch")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelBuildError(f"the C compiler {cc} does not run: {e}") from e
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()]))
    path = _cache_dir() / f"fused_cpu-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise KernelBuildError(f"{cc} failed to compile {SOURCE.name}:\n{done.stderr.strip()}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.capsdist_moments.argtypes = [i32] * 4 + [ptr] * 12
    lib.capsdist_lse.argtypes = [i32] * 4 + [ptr] * 8
    lib.capsdist_backward.argtypes = [i32] * 5 + [ptr] * 21
    for f in (lib.capsdist_moments, lib.capsdist_lse, lib.capsdist_backward):
        f.restype = None
    return lib


def available() -> str | None:
    """None when the kernels compile and load here, else the reason they do not."""
    try:
        library()
    except (KernelBuildError, OSError) as e:
        return str(e)
    return None


def _chunks(N: int) -> int:
    """How many chunks the N problems of a call go in: at most CHUNKS, whatever the thread count."""
    return min(N, CHUNKS)


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _t(x: torch.Tensor | None) -> torch.Tensor | None:
    """(N, O, 16) -> the kernels' (N, 16, O), contiguous; (I, O, 16) W likewise."""
    return None if x is None else x.transpose(1, 2).contiguous()


def _back(xt: torch.Tensor) -> torch.Tensor:
    """(N, 16, O) -> (N, O, 16), contiguous."""
    return xt.transpose(1, 2).contiguous()


class CKernels:
    """fused_votes' three kernels (moments, lse, backward) run by fused_cpu.c; tensors as fused_votes gives them:
    float32, contiguous, M (N', I, 16), W (I, O, 16), offsets (I, 16) or None, per-parent (N', O[, 16])."""

    def moments(self, M, W, offsets, e, c, a, shift):
        N, I, _ = M.shape
        O = W.shape[1]
        mu, inv, b = e if e is not None else (None, None, None)
        Wt, mut, invt, shiftt = _t(W), _t(mu), _t(inv), _t(shift)
        S0, S1t, S2t = M.new_empty(N, O), M.new_empty(N, P, O), M.new_empty(N, P, O)
        ptrs = map(_ptr, (M, Wt, offsets, mut, invt, b, c, a, shiftt, S0, S1t, S2t))
        library().capsdist_moments(N, _chunks(N), I, O, *ptrs)
        return S0, _back(S1t), _back(S2t)

    def lse(self, M, W, offsets, mu, inv, b):
        N, I, _ = M.shape
        O = W.shape[1]
        Wt, mut, invt = _t(W), _t(mu), _t(inv)
        L, X = M.new_empty(N, I), M.new_empty(N, I)
        library().capsdist_lse(N, _chunks(N), I, O, *map(_ptr, (M, Wt, offsets, mut, invt, b, L, X)))
        return L, X

    def backward(self, M, W, offsets, mu, inv, b, *, has_e, c=None, a=None, shift=None, gS=None, L=None, gL=None):
        N, I, _ = M.shape
        O = W.shape[1]
        lse = gL is not None
        if not has_e:
            mu = inv = b = None
        Wt, mut, invt, shiftt = _t(W), _t(mu), _t(inv), _t(shift)
        gS0, gS1t, gS2t = (gS[0], _t(gS[1]), _t(gS[2])) if gS is not None else (None, None, None)
        chunks = _chunks(N)
        gM, gWt = torch.empty_like(M), M.new_zeros(chunks, I, P, O)  # a gW buffer per chunk, summed in order
        gmut, ginvt = M.new_zeros(N, P, O), M.new_zeros(N, P, O)
        gb, gc, ga = M.new_zeros(N, O), M.new_zeros(N, I), M.new_zeros(N, I)
        ptrs = map(_ptr, (M, Wt, offsets, mut, invt, b, c, a, shiftt, L, gS0, gS1t, gS2t, gL))
        outs = map(_ptr, (gM, gWt, gmut, ginvt, gb, gc, ga))
        library().capsdist_backward(N, chunks, I, O, int(lse), *ptrs, *outs)
        gW = _back(gWt.sum(dim=0))
        return gM, gW, _back(gmut), _back(ginvt), gb, gc, ga
