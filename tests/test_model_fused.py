"""The fused votes backend (capsdist/model/fused_votes.py) beyond its equivalence with the reference
(tests/test_model_equivalence.py): every routing setting, tile sizes, routing statistics, and when it is used.
Its Triton kernels run on CUDA where there is one (tests/gpu/check.sh), else in Triton's interpreter on the CPU
(tests/conftest.py); its C kernels (fused_cpu.py) on the CPU."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("triton")

from backends import needs_c_compiler  # noqa: E402
from capsdist.config import load_config  # noqa: E402
from capsdist.core.errors import ConfigError  # noqa: E402
from capsdist.model.loss import spread_loss  # noqa: E402
from capsdist.model import CapsNet, RoutingSettings, fused_cpu, fused_votes, layers  # noqa: E402
from capsdist.model.layers import ConvCaps  # noqa: E402
from capsdist.model.routing import VoteFactors, route  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _route_and_grads(seed: int, kernels=None, N: int = 5, I: int = 7, O: int = 5):
    """routing.route over fused votes on random inputs with per-child transforms and coordinate offsets (N' problems,
    I children, O parents): outputs and the gradients of a random functional with respect to M, W, a_in, beta_u,
    beta_a. Triton's kernels on DEVICE, or `kernels` (fused_cpu.CKernels) on the CPU."""
    device = DEVICE if kernels is None else torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    leaves = [
        torch.randn(I, N, 1, 16, generator=g),
        torch.randn(I, O, 4, 4, generator=g) * 0.5,
        torch.rand(N, I, generator=g),
        torch.randn(O, generator=g) * 0.3,
        torch.randn(O, generator=g) * 0.3,
    ]
    leaves = [x.to(device).requires_grad_() for x in leaves]
    M, W, a, bu, ba = leaves
    offsets = (torch.randn(I, 1, 16, generator=g) * 0.1).to(device)
    settings = RoutingSettings(2, final_lambda=0.05, alpha=0.1)
    log_R0 = torch.full((N, I), -math.log(O), device=device)
    votes = fused_votes.FusedVotes.from_factors(
        VoteFactors(M, W, offsets), kernels=kernels or fused_votes.TritonKernels()
    )
    res = route(votes, a, bu, ba, log_R0, settings)
    weights = torch.randn(res.poses.shape, generator=g).to(device)
    loss = (res.poses * weights).sum() + (res.a_out * torch.arange(O, device=device)).sum()
    return [res.poses, res.a_out, res.entropy], torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "moments,backward",
    [
        pytest.param((2, 2), (2, 2), id="2x2"),
        # one problem or one parent per program, as a batch of one image gives the class layer
        pytest.param((1, 4), (1, 4), id="one-problem"),
        pytest.param((4, 1), (4, 1), id="one-parent"),
    ],
)
def test_tile_sizes_do_not_change_results(monkeypatch, moments, backward):
    """Tiles smaller than the problem: masked edges, several parent blocks adding into one gradient row."""
    outputs, grads = _route_and_grads(0)
    small = fused_votes.Blocks(
        moments=fused_votes.Tile(*moments, 4), lse=fused_votes.LseTile(8, 3, 4), backward=fused_votes.Tile(*backward, 4)
    )
    monkeypatch.setattr(fused_votes, "INTERPRETER_BLOCKS", small)
    monkeypatch.setattr(fused_votes, "GPU_BLOCKS", small)
    small_outputs, small_grads = _route_and_grads(0)
    for a, b in zip(outputs + list(grads), small_outputs + list(small_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_c_compiler
@pytest.mark.parametrize("O", [5, 16, 32], ids=["O5-general", "O16-small", "O32-full"])
def test_c_kernels_match_the_triton_kernels(O):
    """Every parent count the C code is compiled for (16, 32) and the general code: the same routing outputs and
    gradients as the Triton kernels, coordinates, E-step terms, lse and both backward modes included."""
    outputs, grads = _route_and_grads(1, N=6, I=9, O=O)
    c_outputs, c_grads = _route_and_grads(1, fused_cpu.CKernels(), N=6, I=9, O=O)
    for t, c in zip(outputs + list(grads), c_outputs + list(c_grads)):
        torch.testing.assert_close(c, t.cpu(), rtol=1e-4, atol=1e-5 * max(1.0, t.abs().max().item()))


@needs_c_compiler
def test_c_kernels_give_the_same_bits_on_any_thread_count(monkeypatch):
    """The problems go in fixed chunks, so the CPU share's thread changes cannot change a run (exact resume)."""
    monkeypatch.setattr(fused_cpu, "CHUNKS", 4)
    runs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outputs, grads = _route_and_grads(2, fused_cpu.CKernels(), N=11, I=9, O=16)
        runs.append(outputs + list(grads))
    torch.set_num_threads(1)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


FUSED_IMPLS = ["triton", pytest.param("c", marks=needs_c_compiler)]


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_every_routing_setting_reaches_the_fused_path(impl):
    """A CapsNet with every RoutingSettings field off its default (beta_a_scale and class_lambda_scale among them)
    gives the same loss and gradients with fused and torch routing, and the settings change the result."""
    settings = RoutingSettings(
        iterations=2,
        final_lambda=0.02,
        alpha=0.1,
        variance_floor=1e-3,
        estep_temperature=4.0,
        class_lambda_scale=0.25,
        beta_a_scale=7.0,
    )
    device = DEVICE if impl == "triton" else torch.device("cpu")
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.tensor([1, 3], device=device)

    def loss_and_grads(routing, impl):
        torch.manual_seed(0)
        net = CapsNet(A=8, B=3, C=3, D=3, num_classes=4, input_size=28, routing=routing, routing_impl=impl)
        net = net.to(device)
        with torch.no_grad():
            for layer in (net.conv_caps1, net.conv_caps2, net.class_caps):
                layer.beta_a.fill_(0.05)
        loss = spread_loss(net(x), y, margin=0.5)
        return loss.detach(), torch.autograd.grad(loss, list(net.parameters()))

    torch_loss, torch_grads = loss_and_grads(settings, "torch")
    fused_loss, fused_grads = loss_and_grads(settings, impl)
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-4, atol=1e-6)
    for f, t in zip(fused_grads, torch_grads):
        torch.testing.assert_close(f, t, rtol=1e-4, atol=1e-4 * t.abs().max().item())
    paper_loss, _ = loss_and_grads(RoutingSettings(iterations=2), impl)
    assert not torch.allclose(paper_loss, fused_loss)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_routing_statistics_match_the_torch_path(impl):
    """Mean activation and assignment entropy (the entropy from the lse kernel's softmax-weighted mean)."""
    torch.manual_seed(3)
    device = DEVICE if impl == "triton" else torch.device("cpu")
    layer = ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings(3, final_lambda=0.05))
    poses, acts = torch.randn(2, 2, 16, 4, 4).to(device), torch.rand(2, 2, 4, 4).to(device)
    stats = {}
    for impl in ("torch", impl):
        run = copy.deepcopy(layer).to(device)
        run.routing_impl = impl
        run(poses, acts)
        stats[impl] = {k: float(v) for k, v in run.last_stats.items()}
    assert stats["torch"] == pytest.approx(stats[impl], rel=1e-5, abs=1e-7)


def test_auto_is_c_on_the_cpu_torch_on_cuda_until_the_gpu_check_passes(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    layer = ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings())
    assert layer.routing_impl == "auto" and not layers.AUTO_FUSED
    assert layer.resolved_impl(cpu) == ("torch" if fused_cpu.available() else "c")
    assert layer.resolved_impl(cuda) == "torch"  # auto: torch on CUDA (configs/README.md)
    with monkeypatch.context() as m:  # torch.compile traces the torch path: it cannot trace the C kernels' calls
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert layer.resolved_impl(cpu) == "torch"
    monkeypatch.setattr(layers, "AUTO_FUSED", True)
    assert layer.resolved_impl(cuda) == "triton"
    layer.routing_impl = "torch"
    assert layer.resolved_impl(cuda) == "torch" and layer.resolved_impl(cpu) == "torch"
    layer.routing_impl = "triton"
    assert layer.resolved_impl(cuda) == "triton"
    if fused_votes.interpreter_enabled():  # where there is no CUDA (conftest.py)
        assert layer.resolved_impl(cpu) == "triton"
    monkeypatch.setattr(fused_votes, "interpreter_enabled", lambda: False)
    with pytest.raises(ConfigError, match="model.routing_impl: triton runs on CUDA"):
        layer.resolved_impl(cpu)
    layer.routing_impl = "c"
    with pytest.raises(ConfigError, match="model.routing_impl: c runs on the CPU"):
        layer.resolved_impl(cuda)
    with pytest.raises(ValueError, match="routing_impl must be one of"):
        ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings(), routing_impl="cuda")


def test_without_a_compiler_auto_falls_back_to_torch_with_a_warning_and_c_says_why(monkeypatch):
    monkeypatch.setattr(layers, "_c_kernels_unavailable", lambda: "no C compiler found (set CC or install gcc)")
    layers._warn_c_fallback.cache_clear()
    layer = ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings())
    with pytest.warns(UserWarning, match="falls back to the slower torch path: no C compiler"):
        assert layer.resolved_impl(torch.device("cpu")) == "torch"
    layer.routing_impl = "c"
    with pytest.raises(ConfigError, match="c cannot run here: no C compiler found"):
        layer.resolved_impl(torch.device("cpu"))


def test_routing_impl_config_reaches_every_capsule_layer(tmp_path):
    from capsdist.model import build_model

    path = tmp_path / "c.yaml"
    path.write_text("model: {routing_impl: triton}\n")
    cfg = load_config(path)
    assert cfg.model.routing_impl == "triton"
    net = build_model(cfg.model, in_channels=1, input_size=28, num_classes=5)
    assert {layer.routing_impl for layer in (net.conv_caps1, net.conv_caps2, net.class_caps)} == {"triton"}
    with pytest.raises(ConfigError, match="model.routing_impl"):
        load_config(path, ["model.routing_impl=cuda"])


@needs_c_compiler
def test_the_c_kernels_compile_once_into_the_cache_and_a_failing_compiler_says_why(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("CAPSDIST_KERNEL_CACHE", str(cache))
    fused_cpu.library.cache_clear()
    try:
        fused_cpu.library()
        (built,) = cache.iterdir()
        assert built.name.startswith("fused_cpu-") and built.suffix == ".so"
        stamp = built.stat().st_mtime_ns
        fused_cpu.library.cache_clear()
        fused_cpu.library()
        assert [p.stat().st_mtime_ns for p in cache.iterdir()] == [stamp]  # found, not built again
        cc = tmp_path / "cc"
        cc.write_text(
            '#!/bin/sh\n[ "$1" = --version ] && { echo fakecc 1; exit 0; }\necho "error: broken" >&2; exit 1\n'
        )
        cc.chmod(0o755)
        monkeypatch.setenv("CC", str(cc))
        fused_cpu.library.cache_clear()
        with pytest.raises(fused_cpu.KernelBuildError, match="failed to compile fused_cpu.c:\nerror: broken"):
            fused_cpu.library()
        assert list(cache.iterdir()) == [built]  # nothing half-written left behind
    finally:
        fused_cpu.library.cache_clear()
