"""CPU thread budget of a training process: loader workers, intra-op threads, and how idle threads wait.

On a machine shared with loader workers or other jobs, intra-op threads that spin at OpenMP barriers while
another process holds the cores collapse the speed (docs/benchmarks.md, "CPU on a shared machine"). The budget, per
process:
    cores      the CPUs this process may run on (its affinity mask), shared by the processes on this node
               (LOCAL_WORLD_SIZE, set by accelerate launch and torchrun)
    workers    data.num_workers, or with `auto` none up to 2 cores per process (decoding costs a few percent of
               a CapsNet step, less than a worker's share of 2 cores), else a quarter of the cores (at most 8)
    threads    the training process's intra-op threads: the cores left after the workers, at least 1; an
               OMP_NUM_THREADS in the environment is the user's (or torchrun's) choice and wins
Loader workers decode with one thread each (torch's DataLoader sets one intra-op thread in every worker).
How idle OpenMP threads wait is set by capsdist.core.cli.setup_process before the launch scripts import torch (OpenMP
reads it once): the training scripts spin a while, then sleep, and capsdist.core.cpu_share lowers the intra-op threads
while other processes want the cores; the others sleep at once (OMP_WAIT_POLICY=PASSIVE). Importing this module
changes nothing; `apply` sets the intra-op threads and logs the whole budget once.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

MAX_AUTO_WORKERS = 8


class ThreadBudget(NamedTuple):
    cores: int  # CPUs this process may use (its share of the node's)
    workers: int  # loader worker processes
    threads: int  # intra-op threads of the training process

    def describe(self) -> str:
        return (
            f"threads: {self.cores} core(s) for this process, {self.workers} loader worker(s) with 1 thread "
            f"each, {self.threads} intra-op thread(s), {torch.get_num_interop_threads()} inter-op, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
        )


def process_cores() -> int:
    """CPUs this process may use: its affinity mask divided among the processes on this node."""
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def auto_workers(cores: int) -> int:
    """Loader workers for a process with `cores` CPUs: none up to 2 cores, then a quarter of them (1 to 8)."""
    return 0 if cores <= 2 else min(MAX_AUTO_WORKERS, max(1, cores // 4))


def budget(num_workers: int | str, cores: int | None = None) -> ThreadBudget:
    """The budget for data.num_workers (a count or "auto") on `cores` CPUs (default: this process's share)."""
    cores = process_cores() if cores is None else cores
    workers = auto_workers(cores) if num_workers == "auto" else int(num_workers)
    explicit = explicit_threads()
    return ThreadBudget(cores, workers, max(1, cores - workers) if explicit is None else explicit)


def explicit_threads() -> int | None:
    """The intra-op threads OMP_NUM_THREADS asks for (the user's or torchrun's choice), None when it is unset."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def apply(plan: ThreadBudget, log: logging.Logger) -> None:
    """Give the training process its intra-op threads and log the settings once."""
    torch.set_num_threads(plan.threads)
    log.info(plan.describe())
