"""Losses on class activations and the spread-loss margin schedules, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from capsdist.model.loss import categorical_crossentropy, make_loss, margin_at, spread_loss, squared_hinge

# Two samples, three classes; targets 0 and 1.
ACTS = torch.tensor([[0.9, 0.3, 0.8], [0.2, 0.6, 0.5]])
TARGETS = torch.tensor([0, 1])


def test_spread_loss_hand_computed():
    # margin 0.5, L_n = sum_{i != t} max(0, m - (a_t - a_i))^2
    # sample 0 (a_t = 0.9): i=1: 0.5 - 0.6 = -0.1 -> 0;     i=2: 0.5 - 0.1 = 0.4 -> 0.16;  sum 0.16
    # sample 1 (a_t = 0.6): i=0: 0.5 - 0.4 = 0.1 -> 0.01;   i=2: 0.5 - 0.1 = 0.4 -> 0.16;  sum 0.17
    # mean over the batch: (0.16 + 0.17) / 2 = 0.165
    loss = spread_loss(ACTS, TARGETS, 0.5)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.165, abs=1e-6)
    # margin 0.2: sample 0: max(0, 0.2-0.6)=0, max(0, 0.2-0.1)=0.1 -> 0.01; sample 1: 0.2-0.4 < 0, 0.2-0.1 -> 0.01
    assert spread_loss(ACTS, TARGETS, 0.2).item() == pytest.approx(0.01, abs=1e-6)


def test_spread_loss_excludes_the_target_class():
    # all activations equal: each of the K-1 = 2 other classes costs m^2 = 0.04, the target itself nothing
    acts = torch.full((3, 3), 0.5)
    assert spread_loss(acts, torch.tensor([0, 1, 2]), 0.2).item() == pytest.approx(0.08, abs=1e-7)
    # a perfect, confident prediction costs nothing
    assert spread_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]), 0.9).item() == 0.0


def test_spread_loss_gradient():
    # d/da of sample 0 at margin 0.5 (batch of 2, mean): only i=2 is active, gap 0.4:
    # d/da_2 = 2 * 0.4 / 2 = 0.4, d/da_0 = -0.4, d/da_1 = 0
    a = ACTS.clone().requires_grad_()
    spread_loss(a, TARGETS, 0.5).backward()
    torch.testing.assert_close(a.grad[0], torch.tensor([-0.4, 0.0, 0.4]))
    # sample 1: i=0 gap 0.1, i=2 gap 0.4 -> d/da_0 = 0.1, d/da_2 = 0.4, d/da_1 = -0.5
    torch.testing.assert_close(a.grad[1], torch.tensor([0.1, -0.5, 0.4]))


def test_categorical_crossentropy_hand_computed():
    # activations normalised to sum 1: sample 0: 0.9 / 2.0 = 0.45 -> -ln 0.45 = 0.7985076962
    #                                  sample 1: 0.6 / 1.3         -> -ln(0.6/1.3) = 0.7731898882
    # mean: 0.7858487922
    assert categorical_crossentropy(ACTS, TARGETS).item() == pytest.approx(0.7858487922, abs=1e-6)
    # zero activations are clamped to 1e-7, not log(0)
    loss = categorical_crossentropy(torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(1e-7 / (1.0 + 1e-7)), rel=1e-5)


def test_squared_hinge_hand_computed():
    # y = +1 for the target, -1 otherwise; max(0, 1 - y a)^2, mean over classes and batch:
    # sample 0: (1-0.9)^2 = 0.01, (1+0.3)^2 = 1.69, (1+0.8)^2 = 3.24
    # sample 1: (1+0.2)^2 = 1.44, (1-0.6)^2 = 0.16, (1+0.5)^2 = 2.25
    # sum 8.79 over 6 entries = 1.465
    assert squared_hinge(ACTS, TARGETS).item() == pytest.approx(1.465, abs=1e-6)


def test_losses_accept_bfloat16_and_return_float32():
    for loss in (
        spread_loss(ACTS.bfloat16(), TARGETS, 0.5),
        categorical_crossentropy(ACTS.bfloat16(), TARGETS),
        squared_hinge(ACTS.bfloat16(), TARGETS),
    ):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_margin_linear():
    assert margin_at(0, "linear", 1000) == pytest.approx(0.2)
    assert margin_at(500, "linear", 1000) == pytest.approx(0.55)
    assert margin_at(1000, "linear", 1000) == pytest.approx(0.9)
    assert margin_at(5000, "linear", 1000) == pytest.approx(0.9)
    assert margin_at(-5, "linear", 1000) == pytest.approx(0.2)


def test_margin_sigmoid():
    # 0.2 + 0.79 * sigmoid(-4) = 0.2142091, 0.2 + 0.79 * sigmoid(10) = 0.9899641
    assert margin_at(0, "sigmoid", 1000) == pytest.approx(0.2142091, abs=1e-6)
    assert margin_at(1000, "sigmoid", 1000) == pytest.approx(0.9899641, abs=1e-6)
    assert margin_at(10**6, "sigmoid", 1000) == pytest.approx(0.9899641, abs=1e-6)
    # halfway: sigmoid(14 * 0.5 - 4) = sigmoid(3)
    assert margin_at(500, "sigmoid", 1000) == pytest.approx(0.2 + 0.79 / (1 + math.exp(-3)), abs=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
def test_margin_monotone(schedule):
    steps = range(0, 1301, 13)
    values = [margin_at(s, schedule, 1000) for s in steps]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(b > a for a, b in zip(values[:70], values[1:71]))  # strictly rising before the end
    assert values[-1] == values[-2]  # flat after max_margin_images


def test_margin_rejects_unknown_schedule():
    with pytest.raises(ValueError):
        margin_at(0, "cosine", 1000)


def test_make_loss_spread():
    loss_fn = make_loss("spread_loss", margin_schedule="linear", max_margin_images=100)
    loss, margin = loss_fn(ACTS, TARGETS, 0)
    assert margin == pytest.approx(0.2)
    assert loss.item() == pytest.approx(0.01, abs=1e-6)  # spread loss at margin 0.2 (see above)
    loss, margin = loss_fn(ACTS, TARGETS, 100)
    assert margin == pytest.approx(0.9)
    assert loss.item() == pytest.approx(spread_loss(ACTS, TARGETS, 0.9).item())
    assert make_loss("spread_loss", margin_schedule="sigmoid", max_margin_images=100)(ACTS, TARGETS, 0)[
        1
    ] == pytest.approx(0.2142091, abs=1e-6)


@pytest.mark.parametrize("name,expected", [("categorical_crossentropy", 0.7858487922), ("squared_hinge", 1.465)])
def test_make_loss_others(name, expected):
    loss, margin = make_loss(name)(ACTS, TARGETS, 123)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(margin)


def test_make_loss_rejects_unknown_names():
    with pytest.raises(ValueError):
        make_loss("hinge")
    with pytest.raises(ValueError):
        make_loss("spread_loss", margin_schedule="cosine")
