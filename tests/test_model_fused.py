"""The fused votes backend (capsdist/model/fused_votes.py) beyond its equivalence with the reference
(tests/test_model_equivalence.py): every routing setting, tile sizes, routing statistics, and when it is used.
It runs on CUDA where there is one (tests/gpu/check.sh), else in Triton's interpreter on the CPU
(tests/conftest.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("triton")

from capsdist.config import load_config  # noqa: E402
from capsdist.core.errors import ConfigError  # noqa: E402
from capsdist.model.loss import spread_loss  # noqa: E402
from capsdist.model import CapsNet, RoutingSettings, fused_votes, layers  # noqa: E402
from capsdist.model.layers import ConvCaps  # noqa: E402
from capsdist.model.routing import VoteFactors, route  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _route_and_grads(seed: int):
    """routing.route over fused votes on random inputs with per-child transforms and coordinate offsets (N' 5, I 7,
    O 5): outputs and the gradients of a random functional with respect to M, W, a_in, beta_u, beta_a."""
    g = torch.Generator().manual_seed(seed)
    N, I, O = 5, 7, 5
    leaves = [
        torch.randn(I, N, 1, 16, generator=g),
        torch.randn(I, O, 4, 4, generator=g) * 0.5,
        torch.rand(N, I, generator=g),
        torch.randn(O, generator=g) * 0.3,
        torch.randn(O, generator=g) * 0.3,
    ]
    leaves = [x.to(DEVICE).requires_grad_() for x in leaves]
    M, W, a, bu, ba = leaves
    offsets = (torch.randn(I, 1, 16, generator=g) * 0.1).to(DEVICE)
    settings = RoutingSettings(2, final_lambda=0.05, alpha=0.1)
    log_R0 = torch.full((N, I), -math.log(O), device=DEVICE)
    res = route(fused_votes.FusedVotes.from_factors(VoteFactors(M, W, offsets)), a, bu, ba, log_R0, settings)
    weights = torch.randn(res.poses.shape, generator=g).to(DEVICE)
    loss = (res.poses * weights).sum() + (res.a_out * torch.arange(O, device=DEVICE)).sum()
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


def test_every_routing_setting_reaches_the_fused_path():
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
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.tensor([1, 3], device=DEVICE)

    def loss_and_grads(routing, impl):
        torch.manual_seed(0)
        net = CapsNet(A=8, B=3, C=3, D=3, num_classes=4, input_size=28, routing=routing, routing_impl=impl)
        net = net.to(DEVICE)
        with torch.no_grad():
            for layer in (net.conv_caps1, net.conv_caps2, net.class_caps):
                layer.beta_a.fill_(0.05)
        loss = spread_loss(net(x), y, margin=0.5)
        return loss.detach(), torch.autograd.grad(loss, list(net.parameters()))

    torch_loss, torch_grads = loss_and_grads(settings, "torch")
    fused_loss, fused_grads = loss_and_grads(settings, "triton")
    torch.testing.assert_close(fused_loss, torch_loss, rtol=1e-4, atol=1e-6)
    for f, t in zip(fused_grads, torch_grads):
        torch.testing.assert_close(f, t, rtol=1e-4, atol=1e-4 * t.abs().max().item())
    paper_loss, _ = loss_and_grads(RoutingSettings(iterations=2), "triton")
    assert not torch.allclose(paper_loss, fused_loss)


def test_routing_statistics_match_the_torch_path():
    """Mean activation and assignment entropy (the entropy from the lse kernel's softmax-weighted mean)."""
    torch.manual_seed(3)
    layer = ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings(3, final_lambda=0.05))
    poses, acts = torch.randn(2, 2, 16, 4, 4).to(DEVICE), torch.rand(2, 2, 4, 4).to(DEVICE)
    stats = {}
    for impl in ("torch", "triton"):
        run = copy.deepcopy(layer).to(DEVICE)
        run.routing_impl = impl
        run(poses, acts)
        stats[impl] = {k: float(v) for k, v in run.last_stats.items()}
    assert stats["torch"] == pytest.approx(stats["triton"], rel=1e-5, abs=1e-7)


def test_auto_is_torch_until_the_gpu_check_passes_and_triton_needs_cuda_or_the_interpreter(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    layer = ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings())
    assert layer.routing_impl == "auto" and not layers.AUTO_FUSED
    assert not layer.uses_fused(cpu) and not layer.uses_fused(cuda)  # auto: torch, on CUDA too (configs/README.md)
    monkeypatch.setattr(layers, "AUTO_FUSED", True)
    assert layer.uses_fused(cuda) and not layer.uses_fused(cpu)
    layer.routing_impl = "torch"
    assert not layer.uses_fused(cuda)
    layer.routing_impl = "triton"
    assert layer.uses_fused(cuda)
    assert layer.uses_fused(cpu) == fused_votes.interpreter_enabled()  # on where there is no CUDA (conftest.py)
    monkeypatch.setattr(fused_votes, "interpreter_enabled", lambda: False)
    with pytest.raises(ConfigError, match="model.routing_impl: triton runs on CUDA"):
        layer.uses_fused(cpu)
    with pytest.raises(ValueError, match="routing_impl must be one of"):
        ConvCaps(2, 3, kernel=3, stride=1, routing=RoutingSettings(), routing_impl="cuda")


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
