"""Intra-op threads that follow the machine: give cores back while other processes want them, take them again.

OpenMP threads that spin at barriers are fastest alone and collapse when another process wants the same cores;
threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) share well but are slower alone (docs/benchmarks.md, "CPU on
a shared machine"). The training launch scripts let idle threads spin a while, then sleep
(capsdist.core.cli.setup_process), and a CpuShare watches the machine instead: a sampler thread counts, every
`interval_s`, the runnable tasks of other processes (/proc/stat's procs_running less the running threads of this
process and its children, such as loader workers), and each step (`tick`, on the thread that runs the step:
OpenMP's thread count is per calling thread) sets the intra-op threads to the CPUs they leave, between 1 and the
planned count, from the median of the last `window` counts, so that a passing blip changes nothing and a long
step does not slow the answer.

It stays off where the thread count is someone else's choice or does not decide the speed: one planned thread,
OMP_NUM_THREADS set, an affinity mask narrower than the machine (a scheduler's pinning), no /proc/stat, or a
step that does not run on the CPU.
"""

from __future__ import annotations

import collections
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

from capsdist.core import threads

CHILDREN_REFRESH_S = 5.0  # loader workers start with each epoch; looking them up every sample would cost more


def own_pids() -> list[int]:
    """This process and its descendants (loader workers and their children)."""
    me = psutil.Process()
    return [me.pid, *(child.pid for child in me.children(recursive=True))]


class CpuShare:
    """Sets torch's intra-op threads from what other processes leave of the machine's CPUs; `tick` each step."""

    def __init__(
        self,
        planned: int,
        log: logging.Logger,
        *,
        on_cpu: bool = True,
        interval_s: float = 0.2,
        window: int = 5,
        proc: Path = Path("/proc"),
        machine_cpus: int | None = None,
        pids: Callable[[], list[int]] = own_pids,
    ):
        self.planned = self.threads = planned
        self.log = log
        self.interval_s = interval_s
        self.proc = proc
        self.machine_cpus = machine_cpus or os.cpu_count() or 1
        self.pids = pids
        self.demands: collections.deque[int] = collections.deque(maxlen=window)
        self.last_children = -float("inf")
        self.own: list[int] = []
        self.off_reason = self._off_reason(on_cpu)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _off_reason(self, on_cpu: bool) -> str | None:
        if not on_cpu:
            return "the step does not run on the CPU"
        if self.planned <= 1:
            return "one intra-op thread planned"
        if threads.explicit_threads() is not None:
            return "OMP_NUM_THREADS is set"
        if len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
            return "this process is pinned to a subset of the machine's CPUs"
        if not (self.proc / "stat").is_file():
            return f"{self.proc / 'stat'} is not readable"
        return None

    def describe(self) -> str:
        if self.off_reason:
            return f"cpu share: off ({self.off_reason})"
        return (
            f"cpu share: on, 1 to {self.planned} intra-op thread(s) from the runnable tasks of other processes "
            f"on {self.machine_cpus} CPU(s), sampled every {self.interval_s} s"
        )

    def start(self) -> "CpuShare":
        """Start the sampler thread (a daemon; `close` stops it). Nothing happens when the share is off."""
        if self.off_reason is None and self._sampler is None:
            self._sampler = threading.Thread(target=self._sample_every_interval, name="cpu-share", daemon=True)
            self._sampler.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()

    def _sample_every_interval(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample(time.monotonic())

    def sample(self, now: float) -> None:
        """Count the runnable tasks of other processes now (this process's children looked up every few s)."""
        if self.off_reason:
            return
        if now - self.last_children >= CHILDREN_REFRESH_S:
            self.own, self.last_children = self.pids(), now
        self.demands.append(max(0, self._runnable() - sum(self._running_threads(pid) for pid in self.own)))

    def tick(self) -> None:
        """Set the intra-op threads the last `window` samples allow; call it on the thread that runs the step."""
        if self.off_reason or len(self.demands) < self.demands.maxlen:
            return
        others = int(statistics.median(list(self.demands)))
        wanted = max(1, min(self.planned, self.machine_cpus - others))
        if wanted != self.threads:
            self.log.info(
                "cpu share: %d intra-op thread(s), was %d (%d runnable task(s) of other processes)",
                wanted,
                self.threads,
                others,
            )
            torch.set_num_threads(wanted)
            self.threads = wanted

    def _runnable(self) -> int:
        """The machine's runnable tasks now (/proc/stat's procs_running counts this one too)."""
        for line in (self.proc / "stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
        return 0

    def _running_threads(self, pid: int) -> int:
        """Threads of `pid` in state R; 0 for a process that has exited."""
        running = 0
        try:
            tasks = list((self.proc / str(pid) / "task").iterdir())
        except OSError:
            return 0
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # a thread that ended between the listing and the read
            running += stat[stat.rindex(")") + 2 :].startswith("R")
        return running
