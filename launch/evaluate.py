"""Evaluate a trained run: `python launch/evaluate.py --run-dir runs/quickstart [--checkpoint best] [--split test]`.

`--set key=value ...` overrides keys of the run's config.yaml for this evaluation only (for example
data.shards when the shards moved, eval.batch_size); repeatable.

Prints accuracy, per-class accuracy and the confusion matrix, and writes them to
<run-dir>/eval-<checkpoint>-<split>.json. Under `accelerate launch` with several processes
the numbers are exactly those of one process (each sample is counted once).
"""

import argparse
import sys

from capsdist.core.cli import add_set_option, setup_process
from capsdist.core.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--checkpoint", default="best", metavar="best|latest|PATH")
    parser.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "test_familiar"],
        help="test_familiar: with data.viewpoint set, the test images at the training viewpoints "
        "(test then holds the novel ones)",
    )
    add_set_option(parser)
    args = parser.parse_args(argv)

    def body():
        from capsdist.experiments.evaluate import evaluate_run

        evaluate_run(args.run_dir, args.checkpoint, args.split, args.overrides)

    return run_cli(body)


if __name__ == "__main__":
    setup_process()
    sys.exit(main())
