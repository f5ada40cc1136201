"""Plot learning curves of runs: `python launch/plot_runs.py RUN_DIR[=LABEL] ... --out curves.png [--x time]`.

Accuracy (val, test, smoothed train) and training loss against images seen (runs of different batch sizes
share the axis) or training time (the logged step times summed, evaluation left out), from each run's
metrics.jsonl.
"""

import argparse
import sys

from capsdist.core.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR[=LABEL]")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--x", default="images", choices=("images", "time"), help="the x axis (default: images)")
    parser.add_argument("--smooth-steps", type=int, default=50, help="training curves: mean over this many steps")
    args = parser.parse_args(argv)

    def body():
        from capsdist.experiments.curves import plot_curves, read_curves

        specs = [spec.partition("=") for spec in args.runs]
        runs = [read_curves(path, label, smooth_steps=args.smooth_steps, x=args.x) for path, _, label in specs]
        print(f"wrote {plot_curves(runs, args.out, args.title, x=args.x)}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
