"""Prepare a dataset as WebDataset shards plus manifest.json (see capsdist/data/shards.py, docs/data.md).

    python launch/prepare_data.py smallnorb --out shards/smallnorb                  # downloads the NYU files
    python launch/prepare_data.py smallnorb --out shards/smallnorb --source DIR     # the six .mat[.gz] files
    python launch/prepare_data.py fashion-mnist --out shards/fashion-mnist --source /usr/share/datasets/fashion-mnist
    python launch/prepare_data.py fashion-mnist --out shards/fashion-mnist-mini \\
        --source /usr/share/datasets/fashion-mnist --subset train=6000,test=1000 --compress

Running it again on a complete output verifies every shard and changes nothing.
"""

import argparse
import sys
from pathlib import Path

from capsdist.data.shards import prepare
from capsdist.data.sources import DATASETS
from capsdist.core.errors import run_cli


def parse_subset(text: str) -> dict[str, int]:
    """ "train=6000,test=1000" -> {"train": 6000, "test": 1000}."""
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {split.strip(): int(n) for split, n in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--subset {text!r}: expected SPLIT=N[,SPLIT=N...]") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--source", type=Path, help="folder with the raw files; omitted: download them")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--subset", type=parse_subset, help="class-balanced subset sizes, e.g. train=6000,test=1000")
    parser.add_argument("--compress", action="store_true", help="gzip the shards (.tar.gz)")
    parser.add_argument("--cache", type=Path, help="download folder (default ~/.cache/capsdist/DATASET)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size must be at least 1")

    def body():
        prepare(
            args.dataset,
            args.out,
            source=args.source,
            shard_size=args.shard_size,
            subset=args.subset,
            compress=args.compress,
            cache=args.cache,
        )

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
