"""Throughput of the data pipeline alone (read, decode, transform, batch): prints one JSON line.

    python launch/bench_data.py --shards shards/fashion-mnist-mini --batch-size 64 --workers 2 --steps 50
    python launch/bench_data.py --config configs/small.yaml [--set data.num_workers=4 ...] [--steps 100]

One process plays rank 0 of a world of 1 (the per-rank cost is the same at any world size).
samples_per_s counts from the first batch on (worker start-up excluded); total_s includes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import TYPE_CHECKING

from capsdist.core.cli import add_set_option, setup_process
from capsdist.core.errors import run_cli

# capsdist.data imports torch: it is imported where used, after setup_process (OMP_WAIT_POLICY)
if TYPE_CHECKING:
    from capsdist.data import DataOptions


def options(args) -> tuple[DataOptions, int]:
    """DataOptions and batch size from --config (+ overrides) or from the plain flags."""
    from capsdist.data import DataOptions

    if args.config:
        from capsdist.config import load_config
        from capsdist.train.build import data_options

        cfg = load_config(args.config, args.overrides)
        opts = data_options(cfg)
        batch = args.batch_size or cfg.train.batch_size
    else:
        if not args.shards:
            raise SystemExit("bench_data.py: give --shards DIR or --config FILE")
        opts = DataOptions(shards=args.shards, channels=args.channels, pad_crop=args.pad_crop)
        batch = args.batch_size or 64
    if args.workers is not None:
        opts = dataclasses.replace(opts, num_workers=args.workers)
    return opts, batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config (YAML); its data section and train.batch_size are used")
    add_set_option(parser)
    parser.add_argument("--shards", help="dataset directory or URL (without --config)")
    parser.add_argument("--batch-size", type=int, help="batch size (default: the config's, or 64)")
    parser.add_argument("--workers", type=int, help="loader workers (default: the config's, or 2)")
    parser.add_argument("--steps", type=int, default=100, help="batches to time at most (default 100)")
    parser.add_argument("--split", choices=["train", "test"], default="train", help="train (augmented) or test")
    parser.add_argument("--channels", default="both", help="smallNORB: both | left (without --config)")
    parser.add_argument("--pad-crop", type=int, default=0, help="MNIST-likes: pad+crop augmentation")
    args = parser.parse_args(argv)

    def body():
        from capsdist.data import eval_loader, load_manifest, train_loader

        opts, batch = options(args)
        manifest = load_manifest(opts.shards, opts.read_timeout_s)
        if args.split == "train":
            loader = train_loader(manifest, opts, epoch=0, rank=0, world_size=1, per_rank_batch=batch)
        else:
            loader = eval_loader(manifest, opts, "test", rank=0, world_size=1, per_rank_batch=batch)
        start = time.perf_counter()
        first = None
        n = 0
        for n, _ in enumerate(loader, 1):
            if first is None:
                first = time.perf_counter()
            if n > args.steps:
                break
        end = time.perf_counter()
        timed = max(n - 1, 0) * batch  # batches after the first
        print(
            json.dumps(
                {
                    "dataset": manifest.dataset,
                    "shards": opts.shards,
                    "split": args.split,
                    "batch_size": batch,
                    "workers": opts.num_workers,
                    "timed_batches": max(n - 1, 0),
                    "samples_per_s": round(timed / (end - first), 1) if timed else None,
                    "total_s": round(end - start, 3),
                }
            )
        )

    return run_cli(body)


if __name__ == "__main__":
    setup_process()
    sys.exit(main())
