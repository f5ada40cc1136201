"""The CNN baselines: the paper's parameter count, the size-matched variant, shapes, and building by name."""

from __future__ import annotations

import pytest
import torch

from capsdist.config import ModelConfig
from capsdist.model import CNN_PRESETS, MODEL_SIZES, PRESETS, BaselineCNN, CapsNet, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_baseline_has_the_papers_4_2m_parameters():
    """Paper, section 5: 'The CNN baseline ... has 4.2M parameters' (smallNORB: 2 x 32 x 32 input, 5 classes)."""
    model = BaselineCNN.from_preset("cnn", num_classes=5, in_channels=2, input_size=32)
    assert abs(_count(model) - 4.2e6) <= 0.02 * 4.2e6, _count(model)


@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (2, 32, 5)])
def test_small_cnn_is_about_the_size_of_the_small_capsule_net(channels, size, classes):
    cnn = BaselineCNN.from_preset("cnn-small", num_classes=classes, in_channels=channels, input_size=size)
    caps = CapsNet.from_preset("small", num_classes=classes, in_channels=channels, input_size=size)
    assert abs(_count(cnn) - _count(caps)) <= 0.1 * _count(caps), (_count(cnn), _count(caps))
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in cnn.modules())


@pytest.mark.parametrize("preset", list(CNN_PRESETS))
def test_outputs_are_class_probabilities(preset):
    torch.manual_seed(0)
    model = BaselineCNN.from_preset(preset, num_classes=10, in_channels=1, input_size=28).eval()
    probs = model(torch.randn(3, 1, 28, 28))
    assert probs.shape == (3, 10) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(3, 2, 28, 28))


@pytest.mark.parametrize("size", MODEL_SIZES)
def test_every_size_builds_from_the_config(size):
    model = build_model(ModelConfig(size=size), in_channels=1, input_size=28, num_classes=10)
    assert isinstance(model, CapsNet if size in PRESETS else BaselineCNN)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
