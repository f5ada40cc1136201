"""Speed and memory of the trainer's training step (capsdist/train/step.py) and of inference, on synthetic input, in
one process.

The training step is the trainer's own TrainStep on a model and fused optimizer that an Accelerator prepared as the
trainer prepares them (mixed precision, torch.compile through Accelerate): forward under autocast, the loss at the
images seen, the step's all-reduce, GuardedUpdate's backward and device-side skip, gradient clipping, the learning
rate, the fused Adam update. The output lists those parts ("step_parts") and what the trainer adds around them that
the timing leaves out ("step_leaves_out": data loading, logging, evaluation, checkpoints, and on one process the
all-reduce's communication). Timings start after `warmup` steps, so torch.compile's compilation is excluded, and
synchronise the GPU. Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's peak resident set size
on CPU (with the resident size before the first step, so the growth per training image can be read off).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import platform
import resource
import time

import torch

from capsdist.core import threads
from capsdist.config import Config
from capsdist.core.cpu_share import CpuShare
from capsdist.data import DATASETS, input_shape
from capsdist.core.errors import ConfigError
from capsdist.model.loss import make_loss
from capsdist.model import build_model
from capsdist.train.build import make_accelerator
from capsdist.train.metrics import peak_memory_mb
from capsdist.train.step import TrainStep
from capsdist.train.step_profile import profile_steps

log = logging.getLogger(__name__)


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
    profile: bool = False  # after the timed steps, `steps` more under torch.profiler (capsdist.train.step_profile)

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
        profile=False,
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
            profile=profile,
        )


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
    return None if layer is None else layer.resolved_impl(device)


LEAVES_OUT = [
    "data loading (synthetic batches already on the device)",
    "logging (metrics, health statistics, the gradient norms of log steps)",
    "evaluation",
    "checkpoints",
    "communication (one process: the all-reduce has no peer, and no DDP gradient all-reduce)",
]


def run_benchmark(s: BenchSettings) -> dict:
    """Run the benchmark described by `s` and return the result as a flat dict (one JSON line)."""
    cfg = dataclasses.replace(
        s.cfg, train=dataclasses.replace(s.cfg.train, compile=s.compile, mixed_precision=s.mixed_precision)
    )
    accelerator = make_accelerator(cfg, cpu=s.device == "cpu")  # as the trainer's, on the bench's device
    device = accelerator.device
    plan = threads.budget(0)  # the trainer's, for a process that decodes its own batches
    torch.set_num_threads(plan.threads)
    share = CpuShare(plan.threads, log, on_cpu=device.type == "cpu").start()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, in_channels=s.in_channels, input_size=s.input_size, num_classes=s.classes)
    loss_fn = make_loss(
        cfg.loss.name, margin_schedule=cfg.loss.margin_schedule, max_margin_images=cfg.loss.max_margin_images
    )
    schedule_images = (s.warmup + s.steps) * s.batch_size  # the learning rate falls over the bench's steps
    step = TrainStep.prepare(accelerator, model, cfg, loss_fn, schedule_images)
    images = torch.randn(s.batch_size, s.in_channels, s.input_size, s.input_size, device=device)
    labels = torch.randint(0, s.classes, (s.batch_size,), device=device)
    seen = itertools.count(0, s.batch_size)

    def train_step():
        share.tick()
        step(images, labels, next(seen))

    def infer_step():
        with torch.no_grad():
            step.model(images)  # under Accelerate's autocast, as in evaluation

    rss_before = _current_rss_mb() if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step.model.train()
    _timed(train_step, s.warmup, device)
    train_s = _timed(train_step, s.steps, device)
    profiled = profile_steps(train_step, s.steps, model, device) if s.profile else None
    share.close()
    peak_mb = peak_memory_mb(device)
    step.model.eval()
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
        else f"cpu ({platform.processor() or platform.machine()}, {plan.threads} threads)",
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
        "step": "trainer",
        "step_parts": step.parts(),
        "step_leaves_out": LEAVES_OUT,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset"),
        "cpu_share": share.describe(),
        "intra_op_threads_at_end": torch.get_num_threads(),
        "compile": s.compile,
        "mixed_precision": s.mixed_precision,
    }
    if profiled is not None:
        result["profile"] = profiled
    if rss_before is not None:
        result["rss_before_train_mb"] = round(rss_before, 1)
        result["peak_growth_per_train_image_mb"] = round((peak_mb - rss_before) / s.batch_size, 2)
    return result
