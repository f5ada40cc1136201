"""Numerics: no NaN/Inf for extreme inputs (forward and backward), float64 gradcheck, bfloat16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends import needs_c_compiler
from capsdist.model import CapsNet, em_routing
from capsdist.model.layers import ClassCaps, ConvCaps
from capsdist.model.routing import RoutingSettings


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _leaves(n, i, o, vote_scale, seed=0, a_value=None):
    g = torch.Generator().manual_seed(seed)
    votes = (torch.randn(n, i, o, 16, generator=g) * vote_scale).requires_grad_()
    a_in = (torch.rand(n, i, generator=g) if a_value is None else torch.full((n, i), a_value)).requires_grad_()
    beta_u = (torch.randn(o, generator=g) * 0.5).requires_grad_()
    beta_a = (torch.randn(o, generator=g) * 0.5).requires_grad_()
    return votes, a_in, beta_u, beta_a


def _assert_finite_forward_backward(votes, a_in, beta_u, beta_a, iterations=3, **kw):
    poses, a_out = em_routing(votes, a_in, beta_u, beta_a, iterations=iterations, **kw)
    assert torch.isfinite(poses).all() and torch.isfinite(a_out).all()
    assert ((a_out >= 0) & (a_out <= 1)).all()
    # a loss that uses both outputs, scaled so every term matters
    loss = (poses / (poses.detach().abs().max() + 1e-12)).square().sum() + a_out.sum()
    grads = torch.autograd.grad(loss, [votes, a_in, beta_u, beta_a])
    for name, g in zip(("votes", "a_in", "beta_u", "beta_a"), grads):
        assert torch.isfinite(g).all(), f"non-finite gradient of {name}"
    return poses, a_out, grads


@pytest.mark.parametrize("scale", [1e-6, 1e4])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_extreme_vote_scales_stay_finite(scale, alpha):
    poses, _, grads = _assert_finite_forward_backward(*_leaves(3, 10, 4, scale), alpha=alpha)
    # the poses follow the votes' scale (the routing did not collapse to 0 or blow up)
    assert 1e-2 * scale < poses.abs().max() < 1e2 * scale


def test_identical_votes_zero_variance_stay_finite():
    """Every child votes the same pose: zero variance everywhere, the variance floor keeps it finite."""
    votes, a_in, beta_u, beta_a = _leaves(2, 6, 3, 1.0)
    same = votes.detach()[:, :1].expand(-1, 6, -1, -1).clone().requires_grad_()
    _assert_finite_forward_backward(same, a_in, beta_u, beta_a)


def test_all_activations_zero_stay_finite():
    votes, a_in, beta_u, beta_a = _leaves(3, 10, 4, 1.0, a_value=0.0)
    poses, a_out, _ = _assert_finite_forward_backward(votes, a_in, beta_u, beta_a)
    # no data reaches any parent: a_j = logistic(lambda * beta_a), the cost term is 0
    assert torch.allclose(a_out, torch.sigmoid(0.01 * (1 - 0.95**3) * beta_a.detach()).expand_as(a_out))


@pytest.mark.parametrize("o", [1, 3])
def test_single_child_stays_finite(o):
    votes, a_in, beta_u, beta_a = _leaves(2, 1, o, 1.0)
    poses, _, _ = _assert_finite_forward_backward(votes, a_in, beta_u, beta_a)
    # one child: each parent's pose is its vote
    torch.testing.assert_close(poses, votes.detach()[:, 0], rtol=1e-6, atol=1e-6)


def test_single_parent_stays_finite():
    _assert_finite_forward_backward(*_leaves(2, 7, 1, 1.0))


@pytest.mark.parametrize("case", ["tiny", "huge", "zeros"])
def test_capsnet_extreme_inputs_finite_gradients(case):
    """Small CapsNet: forward and the gradient of every parameter stay finite for extreme images."""
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=3, input_size=28, routing=RoutingSettings(iterations=2))
    x = {
        "tiny": torch.randn(2, 1, 28, 28) * 1e-6,
        "huge": torch.randn(2, 1, 28, 28) * 1e4,
        "zeros": torch.zeros(2, 1, 28, 28),
    }[case]
    acts, poses = model(x, return_poses=True)
    assert torch.isfinite(acts).all() and torch.isfinite(poses).all()
    loss = F.cross_entropy(acts, torch.tensor([0, 1])) + 1e-3 * poses.square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"


# ------------------------------------------------------------------------------------------- gradcheck


def _double(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_em_routing_gradcheck_float64(alpha):
    g = torch.Generator().manual_seed(0)
    votes = torch.randn(2, 3, 2, 16, generator=g)
    a_in = torch.rand(2, 3, generator=g) * 0.8 + 0.1
    beta_u, beta_a = torch.randn(2, generator=g) * 0.5, torch.randn(2, generator=g) * 0.5
    inputs = _double(votes, a_in, beta_u, beta_a)
    out = em_routing(*inputs, iterations=2, final_lambda=0.1, alpha=alpha)
    assert all(o.dtype == torch.float64 for o in out), "routing must keep float64 inputs in float64"

    def fn(v, a, bu, ba):
        return em_routing(v, a, bu, ba, iterations=2, final_lambda=0.1, alpha=alpha)

    # full Jacobian without alpha; the randomised fast mode with alpha keeps the suite quick
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=alpha != 0.0)


def test_convcaps_gradcheck_float64():
    """Through the conv normalisation (pitfall 3) and the fused vote gradient, stride 1 (overlapping windows)."""
    torch.manual_seed(0)
    layer = ConvCaps(1, 2, 3, 1, RoutingSettings(2, final_lambda=0.1)).double()
    g = torch.Generator().manual_seed(1)
    poses = torch.randn(1, 1, 16, 4, 3, generator=g, dtype=torch.float64)
    acts = torch.rand(1, 1, 4, 3, generator=g, dtype=torch.float64) * 0.8 + 0.1
    params = [layer.weight, layer.beta_u, layer.beta_a]

    def fn(p, a, w, bu, ba):
        return torch.func.functional_call(layer, {"weight": w, "beta_u": bu, "beta_a": ba}, (p, a))

    inputs = _double(poses, acts, *params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_classcaps_gradcheck_float64():
    torch.manual_seed(0)
    layer = ClassCaps(2, 3, RoutingSettings(2, final_lambda=0.1), coord_add=True).double()
    layer.set_geometry((4.0, 8.5), 28)
    g = torch.Generator().manual_seed(1)
    poses = torch.randn(1, 2, 16, 2, 2, generator=g, dtype=torch.float64)
    acts = torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1

    def fn(p, a, w, bu, ba):
        return torch.func.functional_call(layer, {"weight": w, "beta_u": bu, "beta_a": ba}, (p, a))

    inputs = _double(poses, acts, layer.weight, layer.beta_u, layer.beta_a)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


# ----------------------------------------------------------------------------------------- autocast


def test_bfloat16_autocast_forward_backward(route_calls):
    torch.manual_seed(0)
    routing = RoutingSettings(iterations=2)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28, routing=routing, routing_impl="torch")
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts, poses = model(x, return_poses=True)
        loss = F.cross_entropy(acts, torch.tensor([1, 3])) + poses.float().square().mean()
    loss.backward()
    assert acts.dtype == torch.float32 and poses.dtype == torch.float32
    assert torch.isfinite(acts).all() and torch.isfinite(poses).all()
    assert len(route_calls) == 3  # ConvCaps1, ConvCaps2, ClassCaps
    assert route_calls[0]["votes"].V.dtype == torch.bfloat16  # the vote products did run in bfloat16 ...
    for call in route_calls:  # ... and routing ran in float32
        r = call["result"]
        assert r.poses.dtype == r.a_out.dtype == r.assignments.dtype == r.entropy.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    # close to the float32 model (bfloat16 votes: loose tolerance)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(acts.detach(), ref, rtol=0, atol=0.1)


@needs_c_compiler
def test_bfloat16_autocast_with_the_c_kernels_routes_float32_factors():
    """auto on the CPU: the C kernels take the bfloat16 vote factors as float32 and train in float32."""
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28, routing=RoutingSettings(iterations=2))
    assert model.conv_caps1.resolved_impl(torch.device("cpu")) == "c"
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts = model(x)
        loss = F.cross_entropy(acts, torch.tensor([1, 3]))
    loss.backward()
    assert acts.dtype == torch.float32 and torch.isfinite(acts).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(acts.detach(), ref, rtol=0, atol=0.1)


def test_bfloat16_autocast_initial_assignments_are_float32_exact(route_calls):
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28, routing=RoutingSettings(iterations=1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 1, 28, 28))
    for call in route_calls:
        assert call["log_R0"].dtype == torch.float32
    # ConvCaps1 (12x12 children, 3x3 windows, stride 2): R0 summed over all parents and windows is 1
    layer = model.conv_caps1
    R0 = route_calls[0]["log_R0"].float().exp()  # (N', I), the same for each of the O parents
    n, t, h = 1, layer.in_types, 12
    per_window = (layer.out_types * R0).view(n, 5 * 5, 9, t).permute(0, 3, 2, 1).reshape(n, t * 9, 25)
    per_child = F.fold(per_window, (h, h), 3, stride=2)
    torch.testing.assert_close(per_child[..., :11, :11], torch.ones_like(per_child[..., :11, :11]), rtol=0, atol=1e-5)
