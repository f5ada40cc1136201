"""The small model can learn: it overfits one small batch in a few dozen steps."""

from __future__ import annotations

import pytest
import torch

from capsdist.model.loss import spread_loss
from capsdist.model import CapsNet


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_small_model_overfits_one_batch():
    """Small preset (3 routing iterations), 5 fixed random 28x28 images with 5 distinct labels, Adam at the
    paper's lr 3e-3, spread loss with a fixed margin of 0.5: within 30 steps the loss falls by more than half and
    every image is classified right. (With transforms initialised at std 0.5 instead of 1.0 the class
    activations start near 1, where the logistic is flat, and this fails: 20% accuracy after 100 steps.)"""
    torch.manual_seed(0)
    model = CapsNet.from_preset("small", num_classes=5, input_size=28)
    images = torch.randn(5, 1, 28, 28)
    labels = torch.arange(5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = spread_loss(model(images), labels, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        acts = model(images)
    final = spread_loss(acts, labels, 0.5).item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert final <= 0.5 * losses[0], losses
    assert (acts.argmax(1) == labels).all(), acts


def _shapes_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28x28 images of 4 classes: a horizontal bar, a vertical bar, a hollow square, a diagonal, each drawn
    at a random position over Gaussian noise, standardised per image. Returns images (n, 1, 28, 28), labels (n,)."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, 28, 28, generator=generator)
    offsets = torch.randint(2, 16, (n, 2), generator=generator)
    for k in range(n):
        r, c = offsets[k].tolist()
        canvas = images[k, 0]
        if labels[k] == 0:
            canvas[r + 4 : r + 6, c : c + 10] += 2.0
        elif labels[k] == 1:
            canvas[r : r + 10, c + 4 : c + 6] += 2.0
        elif labels[k] == 2:
            canvas[r : r + 10, c : c + 10] += 2.0
            canvas[r + 2 : r + 8, c + 2 : c + 8] -= 2.0
        else:
            idx = torch.arange(10)
            canvas[r + idx, c + idx] += 2.0
            canvas[r + idx[1:], c + idx[:-1]] += 2.0
    images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / images.std(dim=(1, 2, 3), keepdim=True)
    return images, labels


def test_default_recipe_learns_a_small_task():
    """The guard against changes that break learning: a tiny capsule net (A=8, B=C=D=4) with every routing,
    loss and optimiser setting at its config default learns a 4-class shapes task (chance 25%) to at least 80%
    held-out accuracy within 60 steps of batch 32. Measured: 98.8% with the defaults (2 iterations, E-step
    temperature 4, lr 1e-2); the paper's 3 iterations at lr 3e-3 reach 28.5%, and 2 iterations at temperature 1
    63.7%, so a change that brings back slow routing fails here."""
    from capsdist.config import LossConfig, ModelConfig, OptimConfig
    from capsdist.model.loss import make_loss
    from capsdist.model import build_model

    g = torch.Generator().manual_seed(0)
    train_x, train_y = _shapes_task(60 * 32, g)
    test_x, test_y = _shapes_task(256, g)
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="small", A=8, B=4, C=4, D=4), in_channels=1, input_size=28, num_classes=4)
    loss_cfg, optim_cfg = LossConfig(), OptimConfig()
    loss_fn = make_loss(
        loss_cfg.name, margin_schedule=loss_cfg.margin_schedule, max_margin_images=loss_cfg.max_margin_images
    )
    opt = torch.optim.Adam(model.parameters(), lr=optim_cfg.lr)
    for step in range(60):
        loss, _ = loss_fn(model(train_x[step * 32 : (step + 1) * 32]), train_y[step * 32 : (step + 1) * 32], step * 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy >= 0.8, accuracy
