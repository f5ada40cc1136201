"""Where a training step's time goes: steps run under torch.profiler, summed by operator and by top-level module.

Used by launch/bench.py `--profile`, after its timed steps (the profiler's own cost stays out of the timing).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

FORWARD = "forward::"  # label of a top-level module's forward


@contextlib.contextmanager
def _labelled(model: torch.nn.Module) -> Iterator[None]:
    """Wrap each top-level child's forward in a profiler range named FORWARD + its attribute name."""

    def leave(module, args, output):
        module._profile_range.__exit__(None, None, None)

    handles = []
    for name, child in model.named_children():

        def enter(module, args, label=FORWARD + name):
            module._profile_range = record_function(label)
            module._profile_range.__enter__()

        handles += [child.register_forward_pre_hook(enter), child.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_steps(fn: Callable[[], None], steps: int, model: torch.nn.Module, device: torch.device, top: int = 15):
    """Run `fn` `steps` times under torch.profiler; per step: the `top` operators by self time, and each of
    `model`'s top-level modules' forward (children included). Times are CPU time (on CUDA also device time)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _labelled(model), profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith(FORWARD)]
    total = sum(e.self_cpu_time_total for e in ops) or 1

    def ms(us: float) -> float:
        return round(us / 1e3 / steps, 3)

    def op_row(e) -> dict:
        row = {"op": e.key, "self_cpu_ms": ms(e.self_cpu_time_total), "share": round(e.self_cpu_time_total / total, 4)}
        if cuda:
            row["self_device_ms"] = ms(getattr(e, "self_device_time_total", 0))
        return row | {"calls": round(e.count / steps, 1)}

    return {
        "per": "step",
        "self_cpu_ms_total": ms(total),
        "ops": [op_row(e) for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]],
        "forward_cpu_ms": {e.key[len(FORWARD) :]: ms(e.cpu_time_total) for e in events if e.key.startswith(FORWARD)},
    }
