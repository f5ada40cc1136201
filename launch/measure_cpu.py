"""Speed on a shared CPU (issue 9): bench alone, two benches side by side, a bench beside a training run with
loader workers, and the trainer's images/s with 0, 1, 2 and auto loader workers; one JSON (capsdist/busy_cpu.py).

    python launch/measure_cpu.py --out cpu-speed.json                    # the issue's figures (~15 min, 2 cores)
    python launch/measure_cpu.py --out cpu.json --policies PASSIVE --workers 0 auto   # a subset
    python launch/measure_cpu.py --out tiny.json --tiny                  # tiny models, seconds per run (tests)

Defaults: the full preset at batch 8 on the reference shape (1x32x32, 5 classes, 3 iterations) for the bench
figures; configs/fashion-mnist.yaml (shards/fashion-mnist, prepared on first use) for the training runs, and
launch/bench.py on its model, shape and batch for comparison. Run it on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capsdist.busy_cpu import REPO, Plan, measure
from capsdist.core.errors import run_cli

TINY_MODEL = ["model.A=8", "model.B=2", "model.C=2", "model.D=2", "model.iterations=1"]


def plan_for(tiny: bool) -> Plan:
    if tiny:
        return Plan(
            bench=[
                "--config",
                "configs/small.yaml",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--warmup",
                "0",
                *[a for kv in TINY_MODEL for a in ("--set", kv)],
            ],
            bench_same_shape=[
                "--config",
                "configs/quickstart.yaml",
                "--batch-size",
                "16",
                "--steps",
                "1",
                "--warmup",
                "0",
                *[a for kv in TINY_MODEL for a in ("--set", kv)],
            ],
            train_config="configs/quickstart.yaml",
            train_overrides=[
                *TINY_MODEL,
                f"data.shards={REPO / 'shards' / 'fashion-mnist-mini'}",
                "train.batch_size=16",
                "logging.every_steps=1",
                "checkpoint.every_steps=0",
            ],
            train_steps=3,
        )
    return Plan(
        bench=[
            "--config",
            "configs/full.yaml",
            "--in-channels",
            "1",
            "--input-size",
            "32",
            "--classes",
            "5",
            "--batch-size",
            "8",
            "--steps",
            "8",
            "--warmup",
            "2",
        ],
        bench_same_shape=[
            "--config",
            "configs/fashion-mnist.yaml",  # at its train.batch_size, as the training runs
            "--steps",
            "10",
            "--warmup",
            "1",
        ],
        train_config="configs/fashion-mnist.yaml",
        train_overrides=[],
        train_steps=100,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="tiny models and runs (for tests)")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["PASSIVE", "ACTIVE"],
        choices=["PASSIVE", "ACTIVE"],
        help="OMP_WAIT_POLICY values to measure the bench figures under",
    )
    parser.add_argument("--workers", nargs="+", default=["0", "1", "2", "auto"], help="data.num_workers values")
    args = parser.parse_args(argv)

    def body():
        plan = plan_for(args.tiny)
        plan.policies, plan.workers = args.policies, args.workers
        result = measure(plan)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
