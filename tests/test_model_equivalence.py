"""The fast routing layers against the plain reference in tests/reference_routing.py, forward and gradients.

Two comparisons per layer:
- float64 fast path vs float64 reference, to 1e-9: the same maths, only rounded differently.
- float32 fast path vs the float64 reference, to rtol 1e-5 with atol 4e-5 (outputs are O(1)) and, for
  gradients, atol 2e-5 x the tensor's largest entry: the float32 layer is accurate. (Errors are a few 1e-6
  of each tensor's scale; single poses can be off by up to 3e-5, in every backend alike, and single small
  gradient entries by 1e-3 of themselves, because EM's large costs, lambda * sum_Ra * log sigma, amplify
  float32 rounding: docs/benchmarks.md, the C kernels.)
Every votes backend of the one routing loop (routing.route) is checked: materialised votes (`torch`,
materialised_votes.py) in float64 and float32, the fused Triton kernels (`triton`, fused_votes.py, float32
only) on CUDA where there is one, else in Triton's interpreter on the CPU (tests/conftest.py sets
TRITON_INTERPRET=1 when there is no CUDA device), and the fused C kernels (`c`, fused_cpu.py, float32).
"""

from __future__ import annotations

import copy

import pytest
import torch

from backends import needs_c_compiler, needs_triton
from capsdist.model import em_routing
from capsdist.model.layers import ClassCaps, ConvCaps
from capsdist.model.materialised_votes import materialise
from capsdist.model.routing import RoutingSettings
from reference_routing import reference_class_caps, reference_conv_caps, reference_em_routing


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ITERATIONS = 3
IMPLS = [  # (votes backend by model.routing_impl, dtype)
    pytest.param("torch", torch.float64, id="torch-f64"),
    pytest.param("torch", torch.float32, id="torch-f32"),
    pytest.param(
        "triton",
        torch.float32,
        id="triton-f32",
        marks=needs_triton,
    ),
    pytest.param("c", torch.float32, id="c-f32", marks=needs_c_compiler),
]


def _inputs(seed, n, t, h, w):
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(n, t, 16, h, w, generator=g)
    acts = torch.rand(n, t, h, w, generator=g) * 0.8 + 0.1  # well away from 0 and 1
    return poses, acts


def _set_betas(layer, seed):
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        layer.beta_u.copy_(torch.randn(layer.out_types, generator=g) * 0.5)
        layer.beta_a.copy_(torch.randn(layer.out_types, generator=g) * 0.5)


def _grads(outputs, leaves, seed):
    """Gradients of a fixed random linear functional of the outputs."""
    g = torch.Generator().manual_seed(seed + 200)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, leaves)


def _fast_and_reference(layer, ref_fn, poses, acts, seed, dtype, impl="torch"):
    """Run the fast layer in `dtype` with routing `impl` (triton: on CUDA if there is one) and the reference in
    float64 on the CPU, on the same parameters and inputs."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    fast_layer = copy.deepcopy(layer).to(device, dtype)
    fast_layer.routing_impl = impl
    p_in = poses.to(device, dtype).requires_grad_()
    a_in = acts.to(device, dtype).requires_grad_()
    fast = fast_layer(p_in, a_in)
    leaves = [p_in, a_in, fast_layer.weight, fast_layer.beta_u, fast_layer.beta_a]
    fast = [x.cpu() for x in fast]
    fast_grads = [g.cpu() for g in _grads(fast, leaves, seed)]

    leaves = [x.detach().double().requires_grad_() for x in (poses, acts, layer.weight, layer.beta_u, layer.beta_a)]
    ref = ref_fn(*leaves)[:2]
    ref_grads = _grads(ref, leaves, seed)
    return fast, fast_grads, ref, ref_grads


GRAD_NAMES = ("poses", "activations", "weight", "beta_u", "beta_a")
FLOAT32 = dict(rtol=1e-5, atol=4e-5, grad_rtol=1e-5, grad_atol_rel=2e-5)


def _check(fast, fast_grads, ref, ref_grads, *, rtol, atol, grad_rtol, grad_atol_rel):
    """Outputs to rtol with atol; gradients to grad_rtol with atol = grad_atol_rel * the largest |entry|, so
    entries near 0 are compared on the scale of their tensor."""
    for name, f, r in zip(("poses", "activations"), fast, ref):
        torch.testing.assert_close(f.double(), r.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for name, f, r in zip(GRAD_NAMES, fast_grads, ref_grads):
        assert torch.isfinite(f).all(), name
        assert r.abs().max() > 0, f"reference gradient of {name} is identically zero: the test would be vacuous"
        torch.testing.assert_close(
            f.double(), r, rtol=grad_rtol, atol=grad_atol_rel * r.abs().max().item(), msg=lambda m: f"grad {name}: {m}"
        )


CONV_CASES = [
    # (stride, in types, out types, input size, final_lambda, alpha)
    pytest.param(1, 2, 3, 5, 0.01, 0.0, id="stride1"),
    pytest.param(2, 2, 3, 5, 0.01, 0.0, id="stride2"),
    pytest.param(2, 2, 2, 6, 0.01, 0.0, id="stride2-uncovered-edge"),  # last row/column in no window
    pytest.param(1, 2, 2, 4, 0.05, 0.1, id="stride1-alpha"),
]


@pytest.mark.parametrize("stride,t,o,size,final_lambda,alpha", CONV_CASES)
@pytest.mark.parametrize("impl,dtype", IMPLS)
def test_convcaps_matches_reference(stride, t, o, size, final_lambda, alpha, impl, dtype):
    seed = 10 * stride + size
    torch.manual_seed(seed)
    layer = ConvCaps(
        t, o, kernel=3, stride=stride, routing=RoutingSettings(ITERATIONS, final_lambda=final_lambda, alpha=alpha)
    )
    _set_betas(layer, seed)
    poses, acts = _inputs(seed, 2, t, size, size)

    def ref_fn(p, a, w, bu, ba):
        return reference_conv_caps(
            p, a, w, bu, ba, kernel=3, stride=stride, iterations=ITERATIONS, final_lambda=final_lambda, alpha=alpha
        )

    fast, fast_grads, ref, ref_grads = _fast_and_reference(layer, ref_fn, poses, acts, seed, dtype, impl)
    assert fast[0].shape == ref[0].shape and fast[1].shape == ref[1].shape
    if dtype == torch.float64:
        _check(fast, fast_grads, ref, ref_grads, rtol=1e-9, atol=1e-9, grad_rtol=1e-7, grad_atol_rel=1e-8)
    else:
        _check(fast, fast_grads, ref, ref_grads, **FLOAT32)


CLASS_CASES = [
    # (coord_add, centre_scale, input_size)
    pytest.param(False, (1.0, 0.5), 1, id="plain"),
    pytest.param(True, (1.0, 0.5), 1, id="coord-default-geometry"),
    pytest.param(True, (8.0, 9.5), 28, id="coord-capsnet-geometry"),
]


@pytest.mark.parametrize("coord_add,centre_scale,input_size", CLASS_CASES)
@pytest.mark.parametrize("impl,dtype", IMPLS)
def test_classcaps_matches_reference(coord_add, centre_scale, input_size, impl, dtype):
    seed = 7
    torch.manual_seed(seed)
    layer = ClassCaps(3, 4, routing=RoutingSettings(ITERATIONS), coord_add=coord_add)
    layer.set_geometry(centre_scale, input_size)
    _set_betas(layer, seed)
    poses, acts = _inputs(seed, 2, 3, 3, 3)

    def ref_fn(p, a, w, bu, ba):
        return reference_class_caps(
            p,
            a,
            w,
            bu,
            ba,
            coord_add=coord_add,
            centre_scale=centre_scale,
            input_size=input_size,
            iterations=ITERATIONS,
        )

    fast, fast_grads, ref, ref_grads = _fast_and_reference(layer, ref_fn, poses, acts, seed, dtype, impl)
    if dtype == torch.float64:
        _check(fast, fast_grads, ref, ref_grads, rtol=1e-9, atol=1e-9, grad_rtol=1e-7, grad_atol_rel=1e-8)
    else:
        _check(fast, fast_grads, ref, ref_grads, **FLOAT32)


def test_classcaps_coordinate_addition_is_exactly_the_centre_offsets():
    """With identity transforms a vote is the child's pose; coordinate addition adds the scaled receptive-field
    centre row (a * r + b) / input_size to flat entry 3 and the column to flat entry 7, nothing else. The
    poses name their child (entry 0 type, 1 row, 2 column), so this does not depend on the child order."""
    t, o, h, w = 2, 3, 3, 4
    layer = ClassCaps(t, o, routing=RoutingSettings(1), coord_add=True)
    layer.set_geometry((8.0, 9.5), 28)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4).expand_as(layer.weight))
    poses = torch.zeros(1, t, 16, h, w)
    poses[:, :, 0] = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1)
    poses[:, :, 1] = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    poses[:, :, 2] = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    poses[:, :, 5] = 0.25  # an entry coordinate addition must leave alone
    V = materialise(layer.factors(poses)).reshape(1, o, t * h * w, 16)
    ty, r, c = (V[..., k].round().long() for k in (0, 1, 2))
    for j in range(o):  # every child exactly once per class
        assert sorted(zip(ty[0, j].tolist(), r[0, j].tolist(), c[0, j].tolist())) == [
            (a, b, d) for a in range(t) for b in range(h) for d in range(w)
        ]
    torch.testing.assert_close(V[..., 3], (8.0 * r + 9.5) / 28, rtol=0, atol=1e-6)
    torch.testing.assert_close(V[..., 7], (8.0 * c + 9.5) / 28, rtol=0, atol=1e-6)
    layer.coord_add = False
    plain = materialise(layer.factors(poses)).reshape(1, o, t * h * w, 16)
    others = [k for k in range(16) if k not in (3, 7)]
    torch.testing.assert_close(V[..., others], plain[..., others], rtol=0, atol=0)  # nothing else moves
    assert (plain[..., 5] == 0.25).all()
    V = plain
    assert (V[..., 3] == 0).all() and (V[..., 7] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_em_routing_matches_reference(alpha):
    g = torch.Generator().manual_seed(5)
    votes = torch.randn(3, 6, 4, 16, generator=g, dtype=torch.float64)
    a_in = torch.rand(3, 6, generator=g, dtype=torch.float64) * 0.8 + 0.1
    beta_u = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    beta_a = torch.randn(4, generator=g, dtype=torch.float64) * 0.5
    ref = reference_em_routing(votes, a_in, beta_u, beta_a, iterations=3, final_lambda=0.05, alpha=alpha)
    fast64 = em_routing(votes, a_in, beta_u, beta_a, iterations=3, final_lambda=0.05, alpha=alpha)
    fast32 = em_routing(
        votes.float(), a_in.float(), beta_u.float(), beta_a.float(), iterations=3, final_lambda=0.05, alpha=alpha
    )
    for f64, f32, r in zip(fast64, fast32, ref):
        torch.testing.assert_close(f64, r, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(f32.double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_kind", ["conv", "class"])
@pytest.mark.parametrize("impl,dtype", IMPLS)
def test_estep_temperature_matches_reference(layer_kind, impl, dtype):
    """model.estep_temperature divides the E-step log-likelihoods: the fast layers agree with the reference,
    and the temperature really changes the result (the comparison is not vacuous)."""
    seed, temperature = 11, 4.0
    torch.manual_seed(seed)
    routing = RoutingSettings(ITERATIONS, estep_temperature=temperature)
    if layer_kind == "conv":
        layer = ConvCaps(2, 3, kernel=3, stride=1, routing=routing)

        def ref_fn(p, a, w, bu, ba, t=temperature):
            return reference_conv_caps(p, a, w, bu, ba, kernel=3, stride=1, iterations=ITERATIONS, estep_temperature=t)
    else:
        layer = ClassCaps(2, 3, routing=routing, coord_add=True)

        def ref_fn(p, a, w, bu, ba, t=temperature):
            return reference_class_caps(p, a, w, bu, ba, coord_add=True, iterations=ITERATIONS, estep_temperature=t)

    _set_betas(layer, seed)
    poses, acts = _inputs(seed, 2, 2, 5, 5)
    fast, fast_grads, ref, ref_grads = _fast_and_reference(layer, ref_fn, poses, acts, seed, dtype, impl)
    if dtype == torch.float64:
        _check(fast, fast_grads, ref, ref_grads, rtol=1e-9, atol=1e-9, grad_rtol=1e-7, grad_atol_rel=1e-8)
    else:
        _check(fast, fast_grads, ref, ref_grads, **FLOAT32)
    _, _, paper, _ = _fast_and_reference(layer, lambda *args: ref_fn(*args, t=1.0), poses, acts, seed, torch.float64)
    assert not torch.allclose(ref[1], paper[1]), "temperature 4 routed like temperature 1"
