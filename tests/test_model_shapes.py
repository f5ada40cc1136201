"""CapsNet shapes at every layer, presets, parameter counts, input validation, routing statistics."""

from __future__ import annotations

import pytest
import torch

from capsdist.config import ModelConfig
from capsdist.model import PRESETS, CapsNet, RoutingSettings, build_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# input size -> spatial size after ReLUConv, PrimaryCaps, ConvCaps1, ConvCaps2
SIZES = {32: (14, 14, 6, 4), 28: (12, 12, 5, 3)}


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("preset", ["full", "small"])
def test_shapes_at_every_layer(preset, size, channels):
    A, B, C, D = (PRESETS[preset][k] for k in "ABCD")
    k, n = 5, (1 if preset == "full" else 2)  # full preset: one image keeps the test fast
    torch.manual_seed(0)
    model = CapsNet.from_preset(
        preset, in_channels=channels, input_size=size, num_classes=k, routing=RoutingSettings(iterations=1)
    )
    h1, h2, h3, h4 = SIZES[size]
    x = torch.randn(n, channels, size, size)
    with torch.no_grad():
        feats = model.relu_conv(x)
        assert feats.shape == (n, A, h1, h1)
        assert (feats >= 0).all()
        poses, acts = model.primary_caps(feats)
        assert poses.shape == (n, B, 16, h2, h2) and acts.shape == (n, B, h2, h2)
        poses, acts = model.conv_caps1(poses, acts)
        assert poses.shape == (n, C, 16, h3, h3) and acts.shape == (n, C, h3, h3)
        poses, acts = model.conv_caps2(poses, acts)
        assert poses.shape == (n, D, 16, h4, h4) and acts.shape == (n, D, h4, h4)
        class_poses, class_acts = model.class_caps(poses, acts)
        assert class_poses.shape == (n, k, 16) and class_acts.shape == (n, k)
        # the full forward gives the same as the layers in sequence
        acts2, poses2 = model(x, return_poses=True)
        acts_only = model(x) if preset == "small" else acts2
    assert acts_only.shape == (n, k) and acts2.shape == (n, k) and poses2.shape == (n, k, 16)
    torch.testing.assert_close(acts_only, class_acts)
    torch.testing.assert_close(acts2, class_acts)
    torch.testing.assert_close(poses2, class_poses)
    assert acts_only.dtype == torch.float32
    assert ((acts_only > 0) & (acts_only < 1)).all()


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset,paper", [("full", 310_000), ("small", 68_000)])
def test_parameter_counts_match_the_paper(preset, paper):
    model = CapsNet.from_preset(preset, in_channels=1, input_size=32, num_classes=5)
    assert abs(_count(model) - paper) <= 0.03 * paper, _count(model)


def test_unknown_preset_and_where_parameters_grow():
    with pytest.raises(ValueError):
        CapsNet.from_preset("huge", num_classes=5)
    # parameter count depends on the channels and classes in the expected places only
    base = _count(CapsNet.from_preset("small", in_channels=1, num_classes=5))
    assert _count(CapsNet.from_preset("small", in_channels=2, num_classes=5)) == base + 64 * 25  # conv weights
    assert _count(CapsNet.from_preset("small", in_channels=1, num_classes=6)) == base + 16 * 16 + 2  # W, betas
    # the input size does not change the parameters (weights shared over positions)
    assert _count(CapsNet.from_preset("small", in_channels=1, input_size=28, num_classes=5)) == base


def test_too_small_input_raises():
    with pytest.raises(ValueError):
        CapsNet.from_preset("small", num_classes=5, input_size=16)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28, routing=RoutingSettings(iterations=1))
    with pytest.raises(ValueError):
        model(torch.randn(1, 1, 16, 16))  # too small for ConvCaps2
    with pytest.raises(ValueError):
        model(torch.randn(1, 2, 28, 28))  # wrong number of channels
    with pytest.raises(ValueError):
        model(torch.randn(1, 28, 28))  # not 4-d


def test_class_caps_geometry_is_the_receptive_field_centre():
    """ClassCaps gets the receptive-field centres of ConvCaps2's positions in input pixels: 32x32 input,
    stride 2 * 1 * 2 * 1 = 4 pixels per position, first centre at (5-1)/2 + 2*(3-1)/2 + 4*(3-1)/2 + 0.5."""
    model = CapsNet.from_preset("small", num_classes=5, input_size=32)
    assert model.class_caps.centre_scale == pytest.approx((4.0, 2.0 + 2.0 + 4.0 + 0.5))
    assert model.class_caps.input_size == 32


def test_health_stats_after_forward():
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28, routing=RoutingSettings(iterations=2))
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    stats = model.health_stats()
    assert set(stats) == {"primarycaps", "convcaps1", "convcaps2", "classcaps"}
    for name, layer_stats in stats.items():
        routed = name != "primarycaps"
        assert set(layer_stats) == {"mean_activation", "dead_fraction", "saturated_fraction"} | (
            {"assignment_entropy"} if routed else set()
        )
        assert all(type(v) is float for v in layer_stats.values())
        assert 0.0 < layer_stats["mean_activation"] < 1.0
        assert 0.0 <= layer_stats["dead_fraction"] <= 1.0 and 0.0 <= layer_stats["saturated_fraction"] <= 1.0
        if routed:
            assert layer_stats["assignment_entropy"] >= 0.0
    # ClassCaps: each child spreads over 5 classes, entropy at most log 5
    assert stats["classcaps"]["assignment_entropy"] <= torch.log(torch.tensor(5.0)).item() + 1e-5


def test_dead_and_saturated_capsules_are_counted():
    """A capsule is dead when it stays below 0.01 on every image; an activation above 0.99 is saturated."""
    from capsdist.model.layers import activation_stats

    a = torch.tensor([[0.005, 0.5, 0.995, 0.001], [0.009, 0.002, 0.999, 0.5]])  # (N=2 images, 4 capsules)
    stats = {k: float(v) for k, v in activation_stats(a).items()}
    assert stats["dead_fraction"] == 0.25  # only capsule 0 is below 0.01 on both images
    assert stats["saturated_fraction"] == 0.25  # 2 of 8 activations
    assert abs(stats["mean_activation"] - float(a.mean())) < 1e-7


def _small_net(**routing) -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(A=8, B=4, C=4, D=4, num_classes=5, input_size=28, routing=RoutingSettings(iterations=2, **routing))


def test_routing_keys_reach_the_layers_they_name():
    """model.class_lambda_scale scales only the class capsules' final_lambda; beta_a_scale reaches every routing
    layer: a net with beta_a_scale s equals one whose beta_a parameters are multiplied by s."""
    cfg = ModelConfig(size="small", A=8, B=4, C=4, D=4, final_lambda=0.02, class_lambda_scale=0.25, beta_a_scale=7.0)
    net = build_model(cfg, in_channels=1, input_size=28, num_classes=5)
    assert [net.conv_caps1.routing.final_lambda, net.conv_caps2.routing.final_lambda] == [0.02, 0.02]
    assert net.class_caps.routing.final_lambda == 0.005
    images = torch.rand(3, 1, 28, 28)
    scaled, plain = _small_net(beta_a_scale=7.0), _small_net()
    with torch.no_grad():
        for layer in (scaled.conv_caps1, scaled.conv_caps2, scaled.class_caps):
            layer.beta_a.fill_(0.3)
        for layer in (plain.conv_caps1, plain.conv_caps2, plain.class_caps):
            layer.beta_a.fill_(2.1)
        torch.testing.assert_close(scaled(images), plain(images))
        assert not torch.allclose(scaled(images), _small_net()(images))


def test_authors_init_sets_their_scales():
    """model.init=authors: the weight stds and betas read from the authors' code (CapsNet._init_as_authors)."""
    net = build_model(ModelConfig(size="small", init="authors"), in_channels=1, input_size=28, num_classes=10)
    assert abs(net.relu_conv.conv.weight.std().item() - 0.05) < 0.005
    assert torch.all(net.relu_conv.conv.bias == 0.1) and torch.all(net.primary_caps.activation.bias == -1.0)
    assert abs(net.primary_caps.activation.weight.std().item() - 3.0) < 0.3
    assert abs(net.conv_caps1.weight.std().item() - 0.3) < 0.01
    assert abs(net.class_caps.weight.std().item() - 0.01) < 0.001
    assert torch.all(net.class_caps.beta_u == 2.0) and torch.all(net.class_caps.beta_a == 1.0)
    assert torch.all(net.conv_caps2.beta_u == 0.5) and torch.all(net.conv_caps2.beta_a == 0.5)
    with pytest.raises(ValueError, match="unknown init"):
        CapsNet(A=8, B=4, C=4, D=4, num_classes=5, init="xavier")


def test_stem_keys_deepen_the_stem_and_keep_the_grid():
    """model.stem_convs and model.stem_norm: extra 3x3 convolutions and BatchNorm in the stem, same feature grid
    and receptive-field centres for the capsule layers; without them the stem is the paper's single convolution."""
    cfg = ModelConfig(size="small", A=8, B=4, C=4, D=4, stem_convs=2, stem_norm=True)
    net = build_model(cfg, in_channels=1, input_size=28, num_classes=5)
    plain = build_model(ModelConfig(size="small", A=8, B=4, C=4, D=4), in_channels=1, input_size=28, num_classes=5)
    assert len(net.relu_conv.extra) == 2 and len(net.relu_conv.norms) == 3
    assert not plain.relu_conv.extra and plain.relu_conv.norms is None
    assert _count(net) - _count(plain) == 2 * (8 * 8 * 9 + 8) + 3 * 2 * 8  # two 3x3 convs, three BatchNorms
    assert net.class_caps.centre_scale == plain.class_caps.centre_scale
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        feats = net.relu_conv(x)
    assert feats.shape == plain.relu_conv(x).shape == (4, 8, 12, 12) and (feats >= 0).all()


def test_stem_norm_trains_on_batch_statistics_and_evaluates_per_image():
    """Training forwards update BatchNorm's running statistics; in eval mode an image's output does not depend on
    the other images of its batch (evaluation pads batches, and a served model sees one image at a time)."""
    torch.manual_seed(0)
    net = CapsNet(
        A=8, B=4, C=4, D=4, num_classes=5, input_size=28, stem_norm=True, routing=RoutingSettings(iterations=2)
    )
    x = torch.rand(6, 1, 28, 28)
    norm = net.relu_conv.norms[0]
    with torch.no_grad():
        net(x)
    assert norm.num_batches_tracked.item() == 1 and not torch.all(norm.running_mean == 0)
    assert {"relu_conv.norms.0.running_mean", "relu_conv.norms.0.running_var"} <= set(net.state_dict())
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x[:1]), net(x)[:1])
    assert norm.num_batches_tracked.item() == 1


@pytest.mark.parametrize("size", [28, 32])
def test_stem_pool_keeps_the_grid_and_places_each_window(size):
    """model.stem_pool: a stride-1 convolution and 2x2 max-pooling give the stride-2 stem's grid; stem position p
    sees input rows 2p .. 2p+5 (one wider than the stride-2 convolution's 2p .. 2p+4), and the class capsules'
    coordinates are the centres of those windows."""
    torch.manual_seed(0)
    pooled = build_model(
        ModelConfig(size="small", A=4, B=4, C=4, D=4, stem_pool=True), in_channels=1, input_size=size, num_classes=5
    )
    plain = build_model(ModelConfig(size="small", A=4, B=4, C=4, D=4), in_channels=1, input_size=size, num_classes=5)
    x = torch.rand(1, 1, size, size, requires_grad=True)
    feats = pooled.relu_conv(x)
    assert feats.shape == plain.relu_conv(x).shape == (1, 4, SIZES[size][0], SIZES[size][0])
    p = 3
    feats[0, :, p, :].sum().backward()
    rows = x.grad[0, 0].abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows == list(range(2 * p, 2 * p + 6))
    a, b = plain.class_caps.centre_scale
    assert pooled.class_caps.centre_scale == pytest.approx((a, b + 0.5))
