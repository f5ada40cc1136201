"""Training health: the class-capsule warning and the gradient norms logged on log steps."""

from __future__ import annotations

import torch

from capsdist.model import CapsNet, RoutingSettings
from capsdist.train.health import ClassHealthMonitor, grad_norms


def test_class_health_monitor_warns_once_when_all_dead_and_again_on_recovery(caplog):
    monitor = ClassHealthMonitor(patience=20)
    healthy = {"dead_fraction": 0.0, "saturated_fraction": 0.1}
    dead = {"dead_fraction": 1.0, "saturated_fraction": 0.0}
    with caplog.at_level("WARNING", logger="capsdist"):
        for step in (10, 20):
            monitor.update(dead, step)
        assert not caplog.records  # 10 steps: not yet
        for step in (30, 40, 50):
            monitor.update(dead, step)
        assert [r.getMessage() for r in caplog.records] == [
            "step 30: the class capsules have been all dead for 20 steps (activations below 0.01 on every image: "
            "lower optim.lr or model.final_lambda)"
        ]
        monitor.update(healthy, 60)
        assert caplog.records[-1].getMessage() == "step 60: the class capsules are no longer all dead"
        monitor.update({"dead_fraction": 0.0, "saturated_fraction": 1.0}, 70)
        monitor.update({"dead_fraction": 0.0, "saturated_fraction": 1.0}, 90)
        assert "all saturated for 20 steps" in caplog.records[-1].getMessage()


def test_grad_norms_per_layer_and_total():
    torch.manual_seed(0)
    model = CapsNet(A=8, B=4, C=4, D=4, num_classes=3, input_size=28, routing=RoutingSettings(iterations=1))
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    norms = grad_norms(model)
    layers = ["relu_conv", "primary_caps", "conv_caps1", "conv_caps2", "class_caps"]
    assert set(norms) == {f"grad_norm/{name}" for name in layers + ["total"]}
    assert all(value > 0 for value in norms.values())
    for name, p in model.named_parameters():  # every W, beta_u, beta_a and conv weight is reached
        assert p.grad.abs().sum() > 0, name
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert abs(norms["grad_norm/total"] - float(expected)) <= 1e-5 * float(expected)
    model.zero_grad(set_to_none=True)
    assert grad_norms(model) == {}
