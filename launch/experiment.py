"""The paper's experiments beyond accuracy, capsules against the CNN baseline: `experiment.py viewpoints|adversarial`.

viewpoints   smallNORB novel viewpoints (capsdist.experiments.viewpoints). Either train both models here:
                 --config CONFIG --split azimuth|elevation --out DIR [--set K=V ...] [--cnn-set K=V ...]
             (DIR/capsules from CONFIG, DIR/cnn with the CNN recipe; --set applies to both, --cnn-set to the CNN),
             or compare two runs trained with data.viewpoint set:
                 --run-dir CAPS[=LABEL] --run-dir CNN[=LABEL] --out DIR [--split S] [--set K=V ...]
             (--set then overrides both runs' config.yaml, e.g. data.shards). Every checkpoint is evaluated on
             familiar and novel test viewpoints; writes DIR/viewpoints-<split>.json, .md and .png.
adversarial  FGSM or BIM (capsdist.experiments.attacks) against the checkpoint of each run:
                 --run-dir DIR[=LABEL] ... --attack fgsm|bim --targeted|--untargeted --eps 0 0.01 0.05 ... --out DIR
                 [--limit N] [--steps N] [--checkpoint best|latest|PATH ...] [--seed S] [--set K=V ...]
             writes DIR/adversarial-<attack>-<targeted|untargeted>.json, .md and .png, and logs W&B line plots when
             the first run's config enables W&B (--set logging.wandb.mode=disabled turns it off).

A capsdist error (bad arguments, a run trained otherwise, missing data or checkpoints) prints its message and exits 2.
"""

import argparse
import sys
from pathlib import Path

from capsdist.core.cli import add_set_option, setup_process
from capsdist.core.errors import ConfigError, run_cli


def _runs(specs: list[str]) -> list[tuple[Path, str]]:
    """RUN_DIR[=LABEL] -> (path, label); the label defaults to the folder's name."""
    pairs = [spec.partition("=") for spec in specs]
    return [(Path(path), label or Path(path).name) for path, _, label in pairs]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    commands = parser.add_subparsers(dest="experiment", required=True)

    views = commands.add_parser("viewpoints", help="smallNORB: familiar vs novel viewpoints at matched accuracy")
    source = views.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="train both models from this config")
    source.add_argument("--run-dir", action="append", metavar="RUN_DIR[=LABEL]", help="a trained run (twice)")
    views.add_argument("--split", choices=["azimuth", "elevation"], help="required with --config")
    views.add_argument("--out", required=True, help="folder for the results (and, with --config, the two runs)")
    add_set_option(views)
    add_set_option(
        views, "--cnn-set", "cnn_overrides", "with --config: overrides for the CNN run only, after the CNN recipe"
    )

    adv = commands.add_parser("adversarial", help="FGSM / BIM: accuracy and success rate against epsilon")
    adv.add_argument(
        "--run-dir",
        action="append",
        required=True,
        metavar="RUN_DIR[=LABEL]",
        help="a trained run to attack; repeat for each model",
    )
    adv.add_argument("--attack", required=True, choices=["fgsm", "bim"])
    targeted = adv.add_mutually_exclusive_group(required=True)
    targeted.add_argument("--targeted", dest="targeted", action="store_true", help="towards a wrong class per image")
    targeted.add_argument("--untargeted", dest="targeted", action="store_false", help="away from the true class")
    adv.add_argument("--eps", type=float, nargs="+", required=True, help="epsilons in pixel units of [0, 1]")
    adv.add_argument("--out", required=True, help="folder for the results")
    adv.add_argument("--limit", type=int, help="attack the first N test images (default: all)")
    adv.add_argument("--steps", type=int, help="BIM iterations (default 10), each of 2.5 * eps / steps")
    adv.add_argument(
        "--checkpoint",
        action="append",
        metavar="best|latest|PATH",
        help="the checkpoint to attack (default best): once for all runs, or once per --run-dir, in order",
    )
    adv.add_argument("--seed", type=int, default=0, help="draws the targets of a targeted attack")
    add_set_option(adv)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def viewpoints():
        from capsdist.experiments.viewpoints import run_viewpoints, train_pair

        if args.config:
            if args.split is None:
                raise ConfigError("viewpoints --config needs --split azimuth or elevation")
            runs = train_pair(args.config, args.split, args.out, args.overrides, args.cnn_overrides)
            run_viewpoints(runs, args.out, split=args.split)
        else:
            if args.cnn_overrides:
                raise ConfigError("--cnn-set applies to the CNN trained with --config; with --run-dir use --set")
            run_viewpoints(_runs(args.run_dir), args.out, split=args.split, overrides=args.overrides)

    def adversarial():
        from capsdist.experiments.attacks import BIM_STEPS
        from capsdist.experiments.adversarial import AttackSpec, run_adversarial

        if args.steps is not None and args.attack != "bim":
            raise ConfigError("--steps sets BIM's iterations; FGSM is one step")
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit {args.limit}: attack at least 1 image")
        spec = AttackSpec(args.attack, args.targeted, tuple(args.eps), steps=args.steps or BIM_STEPS, seed=args.seed)
        run_adversarial(
            _runs(args.run_dir),
            args.out,
            spec,
            limit=args.limit,
            checkpoints=args.checkpoint or ["best"],
            overrides=args.overrides,
        )

    return run_cli(viewpoints if args.experiment == "viewpoints" else adversarial)


if __name__ == "__main__":
    setup_process(spin=True)
    sys.exit(main())
