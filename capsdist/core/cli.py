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


SPIN_COUNT = "10000000"  # GOMP_SPINCOUNT of the training scripts, chosen in docs/benchmarks.md


def setup_process(spin: bool = False) -> None:
    """Set up a launch script's process before anything is built: logging, the CPU allocator, OpenMP waiting.

    Log records go to stderr as `[rank R] LEVEL name: message` (R from the RANK that torchrun and `accelerate
    launch` set; 0 alone). PyTorch's CPU allocator backs large tensors with transparent huge pages when
    THP_MEM_ALLOC_ENABLE is set: EM routing allocates tensors of hundreds of MB every step, and without it
    first-touch page faults cost several times a plain copy (docs/benchmarks.md). It is read once, at the first
    large allocation, so this runs first; THP_MEM_ALLOC_ENABLE=0 opts out.

    How idle OpenMP threads wait at barriers is read once, when torch loads OpenMP, so the launch scripts call
    this before they import torch (a warning says when torch came first); an OMP_WAIT_POLICY already set wins.
    With `spin` (the scripts that train, whose steps are many short parallel regions) idle OpenMP threads spin
    for SPIN_COUNT iterations (about 100 ms; GNU OpenMP's default of 300,000 was slower alone) and then sleep,
    and capsdist.core.cpu_share lowers the intra-op threads while other processes want the cores; a
    GOMP_SPINCOUNT or OMP_WAIT_POLICY already set wins. Without it idle threads sleep at once
    (OMP_WAIT_POLICY=PASSIVE), which shares the cores with loader workers and other jobs at some cost alone
    (docs/benchmarks.md, "CPU on a shared machine").
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if "OMP_WAIT_POLICY" in os.environ or (spin and "GOMP_SPINCOUNT" in os.environ):
        return
    name, value = ("GOMP_SPINCOUNT", SPIN_COUNT) if spin else ("OMP_WAIT_POLICY", "PASSIVE")
    os.environ[name] = value
    if "torch" in sys.modules:
        logging.getLogger("capsdist").warning(
            f"{name}={value} was set after torch was imported: it applies to child processes only"
        )
