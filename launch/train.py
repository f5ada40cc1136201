"""Train a capsule network: `accelerate launch launch/train.py --config configs/full.yaml` (or plain python).

    --config CONFIG            YAML run config (configs/README.md documents every key)
    --set key.sub=value ...    override config keys, for example --set optim.lr=1e-3 train.batch_size=128 (repeatable)
    --resume auto|none|PATH    auto (default): continue from the newest complete checkpoint in the run dir
    --run-dir DIR              where checkpoints, metrics.jsonl, config.yaml and W&B files go
    --max-steps N              stop after N global steps (train.max_steps)
    --checkpoint-every N       steps between checkpoints (checkpoint.every_steps)

A capsdist error (bad config, missing data, unusable checkpoint) prints its message and exits 2.
"""

import argparse
import sys

from capsdist.core.cli import add_set_option, setup_process
from capsdist.core.errors import run_cli

# capsdist.config and the trainer import torch: they are imported in main, after setup_process (OMP_WAIT_POLICY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    add_set_option(parser)
    parser.add_argument("--resume", default="auto", metavar="auto|none|PATH")
    parser.add_argument("--run-dir")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.checkpoint_every is not None:
        overrides.append(f"checkpoint.every_steps={args.checkpoint_every}")

    def body():
        from capsdist.config import load_config

        cfg = load_config(args.config, overrides)
        from capsdist.train.trainer import Trainer  # after the config is known good: accelerate, wandb

        Trainer(cfg, source=args.config, resume=args.resume).fit()

    return run_cli(body)


if __name__ == "__main__":
    setup_process(spin=True)
    sys.exit(main())
