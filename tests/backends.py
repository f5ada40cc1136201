"""Skip marks for the optional votes backends, said once: the Triton kernels need Triton installed, the C kernels a
C compiler (capsdist/model/fused_cpu.py). Without them those backends cannot run here; nothing else is skipped."""

import importlib.util

import pytest

from capsdist.model import fused_cpu

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
needs_c_compiler = pytest.mark.skipif(fused_cpu.compiler() is None, reason="no C compiler for the C kernels")
