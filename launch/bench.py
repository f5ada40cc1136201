"""Benchmark a model's training and inference steps on synthetic input of a config's shape (capsdist.train.benchmark).

    python launch/bench.py --config configs/full.yaml --batch-size 8 --steps 10 [--compile]
        [--mixed-precision bf16|fp16|no] [--device cpu|cuda] [--in-channels 1] [--set model.iterations=2] [--profile]

Prints one JSON line: the dict that capsdist.train.benchmark.run_benchmark returns.
"""

from __future__ import annotations

import argparse
import json
import sys

from capsdist.core.cli import add_set_option, setup_process
from capsdist.core.errors import run_cli

# capsdist.train.benchmark and capsdist.config import torch: they are imported in main, after setup_process
# (OMP_WAIT_POLICY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config (YAML); its model and data shape are used")
    add_set_option(parser)
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="autocast dtype (default: the config's train.mixed_precision)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--in-channels", type=int, default=None, help="override input channels")
    parser.add_argument("--input-size", type=int, default=None, help="override input height and width")
    parser.add_argument("--classes", type=int, default=None, help="override number of classes")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timed steps, run --steps more under torch.profiler and add where their time goes",
    )
    args = parser.parse_args(argv)

    def body():
        from capsdist.train.benchmark import BenchSettings, run_benchmark
        from capsdist.config import load_config

        cfg = load_config(args.config, args.overrides)
        settings = BenchSettings.from_config(
            cfg,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            compile=args.compile,
            mixed_precision=args.mixed_precision,
            device=args.device,
            in_channels=args.in_channels,
            input_size=args.input_size,
            classes=args.classes,
            profile=args.profile,
        )
        print(json.dumps(run_benchmark(settings)))

    return run_cli(body)


if __name__ == "__main__":
    setup_process(spin=True)
    sys.exit(main())
