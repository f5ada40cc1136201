"""FGSM and BIM: the epsilon bound holds in pixel units after normalisation, eps 0 is the identity, targeted BIM
reaches its targets, FGSM lowers a trained model's accuracy; the attack loss is the training cross-entropy."""

from __future__ import annotations

import pytest
import torch

from capsdist.experiments.attacks import attack_loss, bim, fgsm, target_classes
from capsdist.data.transforms import normalise
from capsdist.model.loss import categorical_crossentropy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_model(shape: tuple[int, int, int], classes: int, dataset: str, seed: int = 0):
    """(model, forward): softmax of a linear map of the normalised pixels, as capsdist feeds its models."""
    torch.manual_seed(seed)
    channels, size = shape[0], 32 if dataset == "smallnorb" else shape[1]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, classes))
    return model, lambda pixels: torch.softmax(model(normalise(dataset, pixels)), dim=1)


def attack(name: str, forward, pixels, labels, eps, targets=None):
    if name == "fgsm":
        return fgsm(forward, pixels, labels, eps, targets=targets)
    return bim(forward, pixels, labels, eps, steps=5, targets=targets)


def random_pixels(n: int, shape: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    """(n, *shape) in [0, 1], with whole images at 0 and at 1 so that clipping to the range is exercised."""
    pixels = torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))
    pixels[0], pixels[1, :, :4] = 0.0, 1.0
    return pixels


@pytest.mark.parametrize("name", ["fgsm", "bim"])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("dataset,shape", [("fashion-mnist", (1, 28, 28)), ("smallnorb", (2, 48, 48))])
def test_no_pixel_moves_more_than_eps_and_every_pixel_stays_in_range(name, targeted, dataset, shape):
    _, forward = linear_model(shape, 5, dataset)
    pixels, labels = random_pixels(6, shape), torch.arange(6) % 5
    targets = target_classes(labels, torch.arange(6), 5) if targeted else None
    eps = 0.05
    adversarial = attack(name, forward, pixels, labels, eps, targets)
    change = (adversarial - pixels).abs()
    assert change.max() <= eps + 1e-6 and adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert change.max() >= eps - 1e-6  # the attack spends its budget
    # in model-input units the same attack moves values several times further: the bound is not set there
    assert (normalise(dataset, adversarial) - normalise(dataset, pixels)).abs().max() > 2 * eps


@pytest.mark.parametrize("name", ["fgsm", "bim"])
@pytest.mark.parametrize("targeted", [False, True])
def test_eps_zero_changes_nothing(name, targeted):
    _, forward = linear_model((1, 8, 8), 4, "fashion-mnist")
    pixels, labels = random_pixels(5, (1, 8, 8)), torch.arange(5) % 4
    targets = (labels + 1) % 4 if targeted else None
    assert torch.equal(attack(name, forward, pixels, labels, 0.0, targets), pixels)


def test_a_targeted_bim_reaches_its_targets_on_a_tiny_linear_model():
    _, forward = linear_model((1, 8, 8), 4, "fashion-mnist", seed=3)
    pixels = random_pixels(32, (1, 8, 8), seed=4)
    with torch.no_grad():
        labels = forward(pixels).argmax(dim=1)
    targets = target_classes(labels, torch.arange(32), 4)
    adversarial = bim(forward, pixels, labels, 0.3, steps=20, targets=targets)
    with torch.no_grad():
        assert forward(adversarial).argmax(dim=1).tolist() == targets.tolist()
    assert (targets != labels).all()


def test_fgsm_lowers_the_accuracy_of_a_tiny_trained_model():
    """Two classes told apart by which half of an 8x8 image is brighter; logistic regression learns them."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.arange(256) % 2
    pixels = 0.4 + 0.2 * torch.rand((256, 1, 8, 8), generator=generator)
    brighter = torch.zeros_like(pixels)
    brighter[labels == 0, :, :, :4], brighter[labels == 1, :, :, 4:] = 0.15, 0.15
    pixels = pixels + brighter
    model, forward = linear_model((1, 8, 8), 2, "fashion-mnist")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        attack_loss(forward(pixels), labels).mean().backward()
        optimizer.step()

    def accuracy(images):
        with torch.no_grad():
            return (forward(images).argmax(dim=1) == labels).float().mean().item()

    clean = accuracy(pixels)
    attacked = accuracy(fgsm(forward, pixels, labels, 0.1))
    assert clean >= 0.95 and attacked <= clean - 0.5, (clean, attacked)
    assert accuracy(fgsm(forward, pixels, labels, 0.01)) > attacked  # a smaller budget does less


def test_the_attack_loss_is_the_training_cross_entropy():
    scores = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(6)), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(attack_loss(scores, labels).mean(), categorical_crossentropy(scores, labels))
    tiny = torch.tensor([[1.0, 1e-12]], requires_grad=True)  # a target the model rates at 1e-12 still has a gradient
    attack_loss(tiny, torch.tensor([1])).backward()
    assert tiny.grad[0, 1] < 0


def test_targets_are_wrong_classes_drawn_from_the_sample_index():
    labels, index = torch.arange(200) % 5, torch.arange(200)
    targets = target_classes(labels, index, 5, seed=0)
    assert (targets != labels).all() and set(targets.tolist()) == set(range(5))
    assert torch.equal(target_classes(labels[50:60], index[50:60], 5), targets[50:60])  # a function of the index
    assert not torch.equal(target_classes(labels, index, 5, seed=1), targets)
