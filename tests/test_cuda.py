"""GPU smoke test: the model and a short training run on CUDA. Runs only where CUDA is available.

On a GPU machine: `python -m pytest -q tests/test_cuda.py`. The CPU suite never needs a GPU; these tests
report as skipped there, which is their only skip.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsdist.model.loss import spread_loss
from capsdist.model import CapsNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


def _small_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet.from_preset("small", num_classes=5, in_channels=2, input_size=32)


def test_cuda_matches_cpu_forward_and_gradients():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _small_model()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(6, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 5
    losses = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        loss = spread_loss(model(x.to(device)), y.to(device), margin=0.5)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        scale = p_cpu.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_cuda_fused_routing_matches_torch_routing_in_the_model():
    """The whole model on CUDA with the fused Triton routing against the torch routing, float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = _small_model().cuda()
    fused = copy.deepcopy(reference)
    for model, impl in ((reference, "torch"), (fused, "triton")):
        for layer in (model.conv_caps1, model.conv_caps2, model.class_caps):
            layer.routing_impl = impl
    x = torch.randn(6, 2, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    y = torch.arange(6, device="cuda") % 5
    losses = []
    for model in (reference, fused):
        loss = spread_loss(model(x), y, margin=0.5)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        scale = p_ref.grad.abs().max().item() + 1e-12
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


def test_cuda_bf16_autocast_is_finite_and_routing_stays_float32():
    model = _small_model().cuda()
    x = torch.randn(8, 2, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        acts, poses = model(x, return_poses=True)
        loss = spread_loss(acts, torch.arange(8, device="cuda") % 5, margin=0.5)
    assert acts.dtype == torch.float32 and poses.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(acts).all()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_cuda_quickstart_trains_a_few_steps(tmp_path):
    """launch/train.py on the embedded mini set, on the GPU, bf16: exits 0, losses finite, checkpoint written."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "launch/train.py",
        "--config",
        "configs/quickstart.yaml",
        "--run-dir",
        str(run_dir),
        "--max-steps",
        "30",
        "--checkpoint-every",
        "15",
        "--set",
        "train.mixed_precision=bf16",
        "logging.wandb.mode=disabled",
        "data.num_workers=2",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 30 and all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert any(p.name.startswith("step-") for p in (run_dir / "checkpoints").iterdir())
