"""Properties of EM routing: of em_routing over given votes, of routing.route over the factors of the votes on
each backend (materialised and fused), and of the ConvCaps assignments on each backend (Gritzman's pitfall 3)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from capsdist.model import em_routing
from capsdist.model.layers import ClassCaps, ConvCaps
from capsdist.model.materialised_votes import MaterialisedVotes
from capsdist.model.routing import RoutingSettings, VoteFactors, route


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(seed, n=3, i=8, o=4, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    votes = torch.randn(n, i, o, 16, generator=g, dtype=dtype) * scale
    a_in = torch.rand(n, i, generator=g, dtype=dtype) * 0.8 + 0.1
    beta_u = torch.randn(o, generator=g, dtype=dtype) * 0.5
    beta_a = torch.randn(o, generator=g, dtype=dtype) * 0.5
    return votes, a_in, beta_u, beta_a


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_output_shapes_and_ranges():
    votes, a_in, beta_u, beta_a = _problem(0, n=3, i=8, o=4)
    poses, a_out = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    assert poses.shape == (3, 4, 16) and a_out.shape == (3, 4)
    assert poses.dtype == torch.float32 and a_out.dtype == torch.float32
    assert ((a_out > 0) & (a_out < 1)).all()


def test_rejects_bad_shapes_and_iterations():
    votes, a_in, beta_u, beta_a = _problem(0)
    with pytest.raises(ValueError):
        em_routing(votes[..., :15], a_in, beta_u, beta_a, iterations=2)  # pose of 15 entries
    with pytest.raises(ValueError):
        em_routing(votes, a_in[:, :-1], beta_u, beta_a, iterations=2)  # a_in does not match I
    with pytest.raises(ValueError):
        em_routing(votes, a_in, beta_u, beta_a, iterations=0)
    with pytest.raises(ValueError):
        RoutingSettings(iterations=0)


@pytest.mark.parametrize("iterations", [1, 3])
def test_identical_votes_give_that_pose(iterations):
    """All children vote the same pose for parent j: parent j's pose is that pose (to float rounding)."""
    votes, a_in, beta_u, beta_a = _problem(1, n=4, i=10, o=3, scale=2.0)
    g = torch.Generator().manual_seed(11)
    pose = torch.randn(4, 16, generator=g) * 3.0 + 1.0
    votes[:, :, 1, :] = pose[:, None, :]
    poses, _ = em_routing(votes, a_in, beta_u, beta_a, iterations=iterations, alpha=0.1)
    torch.testing.assert_close(poses[:, 1], pose, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(poses[:, 0], pose, atol=1e-2)  # the other parents are not that pose


def test_zero_activation_children_have_no_influence():
    votes, a_in, beta_u, beta_a = _problem(2, n=4, i=12, o=3)
    a_in[:, :4] = 0.0
    ref = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    g = torch.Generator().manual_seed(12)
    changed = votes.clone()
    changed[:, :4] = torch.randn(4, 4, 3, 16, generator=g) * 3.0 + 2.0  # new votes, other scale and place
    out = em_routing(changed, a_in, beta_u, beta_a, iterations=3)
    for r, o in zip(ref, out):
        _close(o, r)
    # ... and the same children do matter when they are active (the test can fail)
    a_on = a_in.clone()
    a_on[:, :4] = 0.9
    assert not torch.allclose(
        em_routing(votes, a_on, beta_u, beta_a, iterations=3)[0],
        em_routing(changed, a_on, beta_u, beta_a, iterations=3)[0],
        atol=1e-3,
    )


def test_zero_activation_children_with_far_votes_have_no_influence():
    votes, a_in, beta_u, beta_a = _problem(2, n=4, i=12, o=3)
    a_in[:, :4] = 0.0
    ref = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    changed = votes.clone()
    changed[:, :4] = 1000.0 + torch.randn(4, 4, 3, 16, generator=torch.Generator().manual_seed(12))
    out = em_routing(changed, a_in, beta_u, beta_a, iterations=3)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


def test_permuting_children_leaves_outputs_unchanged():
    votes, a_in, beta_u, beta_a = _problem(3, n=3, i=9, o=4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(13))
    ref = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    out = em_routing(votes[:, perm], a_in[:, perm], beta_u, beta_a, iterations=3)
    for r, o in zip(ref, out):
        _close(o, r)
    # a permutation of the votes alone (activations not moved with them) does change the result
    moved = em_routing(votes[:, perm], a_in, beta_u, beta_a, iterations=3)
    assert not torch.allclose(moved[0], ref[0], atol=1e-3)


def test_permuting_parent_types_permutes_outputs():
    votes, a_in, beta_u, beta_a = _problem(4, n=3, i=9, o=4)
    perm = torch.tensor([2, 0, 3, 1])
    poses, a_out = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    p_poses, p_a = em_routing(votes[:, :, perm], a_in, beta_u[perm], beta_a[perm], iterations=3)
    _close(p_poses, poses[:, perm])
    _close(p_a, a_out[:, perm])


@pytest.mark.parametrize("final_lambda", [0.01, 0.1])
def test_agreeing_votes_give_higher_activation(final_lambda):
    """A parent whose votes agree tightly is more active than one whose votes scatter, all else equal."""
    g = torch.Generator().manual_seed(5)
    n, i, o = 4, 16, 2
    centre = torch.randn(n, 1, o, 16, generator=g)
    noise = torch.randn(n, i, o, 16, generator=g)
    votes = centre + noise * torch.tensor([0.01, 1.0]).view(1, 1, o, 1)  # parent 0 tight, parent 1 scattered
    a_in = torch.full((n, i), 0.7)
    zeros = torch.zeros(o)
    _, a_out = em_routing(votes, a_in, zeros, zeros, iterations=3, final_lambda=final_lambda)
    assert (a_out[:, 0] > a_out[:, 1] + 0.05).all(), a_out
    # the same in separate problems: tight votes only vs scattered votes only
    tight = em_routing(centre + 0.01 * noise, a_in, zeros, zeros, iterations=3, final_lambda=final_lambda)[1]
    loose = em_routing(centre + noise, a_in, zeros, zeros, iterations=3, final_lambda=final_lambda)[1]
    assert (tight > loose).all()


def test_alpha_moving_average():
    votes, a_in, beta_u, beta_a = _problem(6, n=3, i=9, o=4)
    plain = em_routing(votes, a_in, beta_u, beta_a, iterations=3, alpha=0.0)
    moving = em_routing(votes, a_in, beta_u, beta_a, iterations=3, alpha=0.1)
    for m in moving:
        assert torch.isfinite(m).all()
    assert not torch.allclose(moving[0], plain[0], atol=1e-5)
    assert not torch.allclose(moving[1], plain[1], atol=1e-7)
    # with one iteration there is no previous pose to average with
    one = em_routing(votes, a_in, beta_u, beta_a, iterations=1, alpha=0.0)
    one_alpha = em_routing(votes, a_in, beta_u, beta_a, iterations=1, alpha=0.1)
    for a, b in zip(one, one_alpha):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_more_iterations_change_the_result():
    votes, a_in, beta_u, beta_a = _problem(7, n=3, i=9, o=4)
    one = em_routing(votes, a_in, beta_u, beta_a, iterations=1)
    three = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    assert not torch.allclose(one[0], three[0], atol=1e-4)


# ------------------------------------------------------------------------- route over factors, each backend


def _device(routing_impl):
    """Where a backend runs: the fused one on CUDA where there is one (else Triton's interpreter, conftest.py)."""
    return torch.device("cuda" if routing_impl == "triton" and torch.cuda.is_available() else "cpu")


def _factors(seed, n=3, i=8, o=4):
    """A routing problem as vote factors (one group per child: M (I, N', 1, 16), W (I, O, 4, 4), offsets),
    with a_in (N', I), beta_u and beta_a (O,)."""
    g = torch.Generator().manual_seed(seed)
    factors = VoteFactors(
        torch.randn(i, n, 1, 16, generator=g),
        torch.randn(i, o, 4, 4, generator=g) * 0.5,
        torch.randn(i, 1, 16, generator=g) * 0.5,
    )
    a_in = torch.rand(n, i, generator=g) * 0.8 + 0.1
    return factors, a_in, torch.randn(o, generator=g) * 0.5, torch.randn(o, generator=g) * 0.5


def _route_factors(routing_impl, factors, a_in, beta_u, beta_a, **settings):
    """routing.route on the backend `routing_impl`, uniform initial assignments -> poses (N', O, P), a_out (N', O)."""
    if routing_impl == "torch":
        make = MaterialisedVotes.from_factors
    else:
        from capsdist.model import fused_cpu, fused_votes

        kernels = fused_votes.TritonKernels() if routing_impl == "triton" else fused_cpu.CKernels()
        make = functools.partial(fused_votes.FusedVotes.from_factors, kernels=kernels)
    device = _device(routing_impl)
    factors = VoteFactors(*(None if x is None else x.to(device) for x in factors))
    n, i, o = a_in.shape + factors.W.shape[1:2]
    log_R0 = torch.full((n, i), -math.log(o), device=device)
    votes = make(factors)
    result = route(votes, a_in.to(device), beta_u.to(device), beta_a.to(device), log_R0, RoutingSettings(**settings))
    return result.poses.cpu(), result.a_out.cpu()


def test_backends_identical_votes_give_that_pose(routing_impl):
    """Every child votes pose_n for parent 1 (identity transforms, no offsets, the same child poses): its pose is
    pose_n."""
    factors, a_in, beta_u, beta_a = _factors(1, n=4, i=10, o=3)
    M, W, _ = factors
    M = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(11)).expand_as(M) * 3.0 + 1.0
    W = W.clone()
    W[:, 1] = torch.eye(4)
    poses, _ = _route_factors(routing_impl, VoteFactors(M, W, None), a_in, beta_u, beta_a, iterations=3, alpha=0.1)
    torch.testing.assert_close(poses[:, 1], M[0, :, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(poses[:, 0], M[0, :, 0], atol=1e-2)  # the other parents are not that pose


@pytest.mark.filterwarnings("error::RuntimeWarning")  # the interpreter's: no exp may overflow, even off the tiles
def test_backends_zero_activation_children_with_far_votes_have_no_influence(routing_impl):
    factors, a_in, beta_u, beta_a = _factors(2, n=4, i=12, o=3)
    a_in[:, :4] = 0.0
    ref = _route_factors(routing_impl, factors, a_in, beta_u, beta_a, iterations=3)
    M = factors.M.clone()
    M[:4] = 300.0 + torch.randn(4, 4, 1, 16, generator=torch.Generator().manual_seed(12))
    out = _route_factors(routing_impl, factors._replace(M=M), a_in, beta_u, beta_a, iterations=3)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    a_in[:, :4] = 0.9  # ... and the same children do matter when they are active (the test can fail)
    moved = _route_factors(routing_impl, factors._replace(M=M), a_in, beta_u, beta_a, iterations=3)
    assert not torch.allclose(moved[0], ref[0], atol=1e-2)


def test_backends_permuting_children_leaves_outputs_unchanged(routing_impl):
    factors, a_in, beta_u, beta_a = _factors(3, n=3, i=9, o=4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(13))
    ref = _route_factors(routing_impl, factors, a_in, beta_u, beta_a, iterations=3)
    permuted = VoteFactors(*(x[perm] for x in factors))
    out = _route_factors(routing_impl, permuted, a_in[:, perm], beta_u, beta_a, iterations=3)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    moved = _route_factors(routing_impl, permuted, a_in, beta_u, beta_a, iterations=3)  # activations left behind
    assert not torch.allclose(moved[0], ref[0], atol=1e-3)


def test_backends_permuting_parent_types_permutes_outputs(routing_impl):
    factors, a_in, beta_u, beta_a = _factors(4, n=3, i=9, o=4)
    perm = torch.tensor([2, 0, 3, 1])
    poses, a_out = _route_factors(routing_impl, factors, a_in, beta_u, beta_a, iterations=3)
    permuted = factors._replace(W=factors.W[:, perm])
    p_poses, p_a = _route_factors(routing_impl, permuted, a_in, beta_u[perm], beta_a[perm], iterations=3)
    torch.testing.assert_close(p_poses, poses[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_a, a_out[:, perm], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ ConvCaps R


def _code_poses(n, t, h, w):
    """Poses that name their child: entry 0 = image, 1 = type, 2 = row, 4 = column (4x4 row-major)."""
    poses = torch.zeros(n, t, 16, h, w)
    poses[:, :, 0] = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    poses[:, :, 1] = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1)
    poses[:, :, 2] = torch.arange(h, dtype=torch.float32).view(1, 1, h, 1)
    poses[:, :, 4] = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w)
    return poses


def _child_index(layer_cls_args, n, t, h, w, route_calls):
    """For every (routing problem, child) of a ConvCaps layer: the child's flat index in the (N, T, H, W) grid,
    read from the votes of an identity-weight copy of the layer fed with self-describing poses (so the test
    does not depend on the layer's internal child order). -> (N', I) int64."""
    in_types, out_types, kernel, stride = layer_cls_args
    probe = ConvCaps(in_types, out_types, kernel, stride, RoutingSettings(1), routing_impl="torch")  # keeps V
    with torch.no_grad():
        probe.weight.copy_(torch.eye(4).expand_as(probe.weight))  # vote = M @ I = M
    probe(_code_poses(n, t, h, w), torch.full((n, t, h, w), 0.5))
    V = route_calls[-1]["votes"].V
    V = V.reshape(*V.shape[:3], 16)[:, 0]  # (N', I, 16), parent type 0 (all types get the same vote)
    b, ty, r, c = (V[..., k].round().long() for k in (0, 1, 2, 4))
    return ((b * t + ty) * h + r) * w + c, (b, ty, r, c)


def _log_assignments(call) -> torch.Tensor:
    """log R (N', O, I) of a recorded routing call: the materialised backend's own, or rebuilt from the fused
    backend's E-step terms and votes, log R = c + b - 1/2 sum_h (V - mu)^2 inv (fused_votes.FusedAssignments)."""
    assignments, votes = call["result"].assignments, call["votes"]
    if isinstance(assignments, torch.Tensor):
        return assignments.cpu()
    terms, c = assignments
    N, I, _ = votes.M.shape
    O = votes.W.shape[1]
    if terms is None:
        return c.unsqueeze(1).expand(-1, O, -1).cpu()
    V = torch.einsum("nirc,iocd->noird", votes.M.view(N, I, 4, 4), votes.W.view(I, O, 4, 4)).reshape(N, O, I, 16)
    if votes.offsets is not None:
        V = V + votes.offsets
    mu, inv, b = terms
    x = b.unsqueeze(-1) - 0.5 * ((V - mu.unsqueeze(2)) ** 2 * inv.unsqueeze(2)).sum(-1)
    return (x + c.unsqueeze(1)).detach().cpu()


@pytest.mark.parametrize("size,kernel,stride", [(14, 3, 2), (6, 3, 1), (7, 3, 2)])
@pytest.mark.parametrize("iterations", [1, 3])
def test_convcaps_assignments_sum_to_one_over_all_windows(size, kernel, stride, iterations, route_calls, routing_impl):
    """Pitfall 3: after routing, each child's R summed over every parent of every window that holds it is 1
    (iterations 1: the uniform initial R; 3: R from an E-step); children in no window have none."""
    n, t, o = 2, 3, 4
    idx, (b, ty, r, c) = _child_index((t, o, kernel, stride), n, t, size, size, route_calls)
    out = (size - kernel) // stride + 1
    # geometry: each routing problem holds exactly one K x K window of all T types of one image
    assert idx.shape == (n * out * out, kernel * kernel * t)
    windows = set()
    for p in range(idx.shape[0]):
        rows, cols = r[p].unique(), c[p].unique()
        assert len(b[p].unique()) == 1 and len(rows) == kernel and len(cols) == kernel
        assert rows.min() % stride == 0 and cols.min() % stride == 0
        assert len(idx[p].unique()) == kernel * kernel * t  # no child twice in a window
        windows.add((b[p, 0].item(), rows.min().item(), cols.min().item()))
    assert len(windows) == n * out * out

    torch.manual_seed(3)
    device = _device(routing_impl)
    layer = ConvCaps(t, o, kernel, stride, RoutingSettings(iterations), routing_impl=routing_impl).to(device)
    g = torch.Generator().manual_seed(4)
    poses = torch.randn(n, t, 16, size, size, generator=g)
    acts = torch.rand(n, t, size, size, generator=g) * 0.8 + 0.1
    layer(poses.to(device), acts.to(device))
    call = route_calls[-1]
    # the child activations routing sees are the grid's activations at the same children
    torch.testing.assert_close(call["a_in"].float().cpu(), acts.reshape(-1)[idx], rtol=0, atol=0)
    R = _log_assignments(call).exp()  # (N', O, I)
    assert R.shape == (idx.shape[0], o, idx.shape[1])
    per_child = torch.zeros(n * t * size * size, dtype=R.dtype).index_add_(0, idx.reshape(-1), R.sum(1).reshape(-1))
    per_child = per_child.view(n, t, size, size)
    covered = torch.zeros(size, size, dtype=torch.bool)
    covered[: (out - 1) * stride + kernel, : (out - 1) * stride + kernel] = True
    torch.testing.assert_close(per_child[:, :, covered], torch.ones_like(per_child[:, :, covered]), rtol=0, atol=1e-5)
    assert (per_child[:, :, ~covered] == 0).all()
    if iterations > 1:  # an E-step ran: R is no longer the uniform start
        R0 = call["log_R0"].exp().cpu().unsqueeze(1)  # (N', 1, I)
        assert (R - R0).abs().max() > 1e-3


def test_convcaps_assignments_not_normalised_per_window(route_calls, routing_impl):
    """Pitfall 3 is handled: with stride 1 a child shares its R among windows, so R summed over the parents of one
    window is below 1 for some children in several windows (a per-window softmax would give exactly 1)."""
    torch.manual_seed(0)
    device = _device(routing_impl)
    layer = ConvCaps(2, 3, 3, 1, RoutingSettings(3), routing_impl=routing_impl).to(device)
    g = torch.Generator().manual_seed(1)
    layer(torch.randn(1, 2, 16, 5, 5, generator=g).to(device), torch.rand(1, 2, 5, 5, generator=g).to(device))
    per_window = _log_assignments(route_calls[-1]).exp().sum(1)  # (N', I)
    assert (per_window < 0.5).any()
    assert per_window.max() <= 1.0 + 1e-5


def test_classcaps_assignments_sum_to_one(route_calls, routing_impl):
    device = _device(routing_impl)
    layer = ClassCaps(3, 5, RoutingSettings(3), routing_impl=routing_impl).to(device)
    g = torch.Generator().manual_seed(2)
    layer(torch.randn(2, 3, 16, 3, 3, generator=g).to(device), torch.rand(2, 3, 3, 3, generator=g).to(device))
    R = _log_assignments(route_calls[-1]).exp()
    assert R.shape == (2, 5, 27)
    torch.testing.assert_close(R.sum(1), torch.ones(2, 27), rtol=0, atol=1e-5)


def test_routing_checkpoint_gives_the_same_gradients():
    """routing_checkpoint=True routes chunks of images and recomputes them in backward: same outputs and
    gradients (float64, so that only the maths is compared, not float32 summation order)."""
    g = torch.Generator().manual_seed(8)
    poses = torch.randn(5, 2, 16, 5, 5, generator=g, dtype=torch.float64)
    acts = torch.rand(5, 2, 5, 5, generator=g, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        layer = ConvCaps(2, 3, 3, 1, RoutingSettings(3), routing_checkpoint=ckpt).double()
        p_in, a_in = poses.clone().requires_grad_(), acts.clone().requires_grad_()
        out_p, out_a = layer(p_in, a_in)
        (out_p.sin().sum() + out_a.sum()).backward()
        grads.append(
            [
                out_p.detach(),
                out_a.detach(),
                p_in.grad,
                a_in.grad,
                layer.weight.grad,
                layer.beta_u.grad,
                layer.beta_a.grad,
            ]
        )
    for x, y in zip(*grads):
        torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


def test_repeated_backward_gives_the_same_gradients():
    """Backward twice through one graph (retain_graph) gives the same vote gradient both times."""
    votes, a_in, beta_u, beta_a = _problem(9, n=2, i=6, o=3)
    votes.requires_grad_()
    poses, a_out = em_routing(votes, a_in, beta_u, beta_a, iterations=3)
    loss = poses.square().sum() + a_out.sum()
    first = torch.autograd.grad(loss, votes, retain_graph=True)[0]
    second = torch.autograd.grad(loss, votes)[0]
    assert first.abs().max() > 0
    torch.testing.assert_close(second, first, rtol=0, atol=0)
