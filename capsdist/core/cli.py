"""What the launch scripts share: the repeatable `--set KEY=VALUE` option and the process setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_set_option(
    parser: argparse.ArgumentParser,
    flag: str = "--set",
    dest: str = "overrides",
    help: str = "override config keys; repeatable, all apply in order (a later one wins on the same key)",
) -> None:
    """`--set a.b=1 c.d=2 --set e.f=3`: every value of every `flag` is kept, in order, in `args.<dest>`."""
    parser.add_argument(flag, nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest=dest, help=help)


def setup_process() -> None:
    """Set up a launch script's process before anything is built: logging, the CPU allocator, OpenMP waiting.

    Log records go to stderr as `[rank R] LEVEL name: message` (R from the RANK that torchrun and `accelerate
    launch` set; 0 alone). PyTorch's CPU allocator backs large tensors with transparent huge pages when
    THP_MEM_ALLOC_ENABLE is set: EM routing allocates tensors of hundreds of MB every step, and without it
    first-touch page faults cost several times a plain copy (docs/benchmarks.md). It is read once, at the first large allocation, so this runs first; THP_MEM_ALLOC_ENABLE=0 opts out.

    Idle OpenMP threads sleep instead of spinning at barriers (OMP_WAIT_POLICY=PASSIVE when it is unset), so
    processes that share the cores (loader workers, other jobs) do not slow each other down many-fold
    (capsdist/core/threads.py). OpenMP reads it once, when torch loads it: the launch scripts call this before they
    import torch, and a warning says when torch came first; OMP_WAIT_POLICY=ACTIVE opts out. The trainer logs
    the value with the thread budget.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        if "torch" in sys.modules:
            logging.getLogger("capsdist").warning(
                "OMP_WAIT_POLICY=PASSIVE was set after torch was imported: it applies to child processes only"
            )
