"""Speed and memory of a model's training and inference steps on synthetic input, in one process.

A training step here is the model's share of the trainer's step: forward, spread loss, backward and an Adam step,
with autocast for mixed precision and a GradScaler for fp16 as Accelerate sets them up. It leaves out what the
trainer adds around the model: Accelerate's wrappers (DDP across processes), the step's one all-reduce, the
learning-rate update, the health statistics and the logging, so on one process it is an upper bound of the trainer's
speed, and across processes it does not measure communication. Timings start after `warmup` steps, so
torch.compile's compilation is excluded, and synchronise the GPU. Peak memory is torch.cuda.max_memory_allocated on
CUDA and the process's peak resident set size on CPU (with the resident size before the first step, so the growth
per training image can be read off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import sys
import time

import torch

from capsdist.config import Config
from capsdist.data import DATASETS, input_shape
from capsdist.errors import ConfigError
from capsdist.loss import spread_loss
from capsdist.model import build_model

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class BenchSettings:
    cfg: Config
    batch_size: int
    steps: int
    warmup: int
    compile: bool
    mixed_precision: str
    device: str
    in_channels: int
    input_size: int
    classes: int

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        batch_size=None,
        steps=10,
        warmup=3,
        compile=False,
        mixed_precision=None,
        device=None,
        in_channels=None,
        input_size=None,
        classes=None,
    ) -> "BenchSettings":
        """Settings from a run config; every keyword that is not None overrides the config's value."""
        spec = DATASETS[cfg.data.dataset]  # the config checked the name; the input the pipeline would give:
        channels, size, _ = input_shape(spec.name, (len(spec.views), *spec.image_size), cfg.data.channels)
        n_classes = len(spec.classes)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is visible to PyTorch")
        if steps < 1 or warmup < 0:
            raise ConfigError("--steps must be >= 1 and --warmup >= 0")
        return cls(
            cfg=cfg,
            batch_size=batch_size or cfg.train.batch_size,
            steps=steps,
            warmup=warmup,
            compile=compile or cfg.train.compile,
            mixed_precision=mixed_precision or cfg.train.mixed_precision,
            device=device,
            in_channels=in_channels or channels,
            input_size=input_size or size,
            classes=classes or n_classes,
        )


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of fn, averaged over `steps` calls (0 for none), GPU synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / max(steps, 1)


def _routing_used(model: torch.nn.Module, device: torch.device) -> str | None:
    """The routing implementation model.routing_impl resolved to on `device` (None for a CNN baseline)."""
    layer = getattr(model, "conv_caps1", None)
    return None if layer is None else ("triton" if layer.uses_fused(device) else "torch")


def run_benchmark(s: BenchSettings) -> dict:
    """Run the benchmark described by `s` and return the result as a flat dict (one JSON line)."""
    torch.manual_seed(s.cfg.train.seed)
    device = torch.device(s.device)
    model = build_model(s.cfg.model, in_channels=s.in_channels, input_size=s.input_size, num_classes=s.classes).to(
        device
    )
    step_model = torch.compile(model) if s.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(s.batch_size, s.in_channels, s.input_size, s.input_size, device=device)
    labels = torch.randint(0, s.classes, (s.batch_size,), device=device)
    dtype = _AUTOCAST.get(s.mixed_precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=s.mixed_precision == "fp16")

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = spread_loss(step_model(images), labels, margin=0.5)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step():
        with torch.no_grad(), autocast():
            step_model(images)

    rss_before = _current_rss_mb() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    _timed(train_step, s.warmup, device)
    train_s = _timed(train_step, s.steps, device)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = _rss_mb()
    model.eval()
    _timed(infer_step, max(1, s.warmup), device)
    infer_s = _timed(infer_step, s.steps, device)
    result = {
        "train_images_per_s": round(s.batch_size / train_s, 2),
        "inference_images_per_s": round(s.batch_size / infer_s, 2),
        "train_s_per_step": round(train_s, 4),
        "inference_s_per_step": round(infer_s, 4),
        "peak_memory_mb": round(peak_mb, 1),
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "preset": s.cfg.model.size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": s.batch_size,
        "input": [s.in_channels, s.input_size, s.input_size],
        "classes": s.classes,
        "routing_iterations": s.cfg.model.iterations,
        "routing_checkpoint": s.cfg.model.routing_checkpoint,
        "routing_impl": s.cfg.model.routing_impl,
        "routing": _routing_used(model, device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "compile": s.compile,
        "mixed_precision": s.mixed_precision,
    }
    if rss_before is not None:
        result["rss_before_train_mb"] = round(rss_before, 1)
        result["peak_growth_per_train_image_mb"] = round((peak_mb - rss_before) / s.batch_size, 2)
    return result
