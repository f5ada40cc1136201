"""What the launch scripts share on their command lines: the repeatable `--set KEY=VALUE` option."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """`--set a.b=1 c.d=2 --set e.f=3`: every value of every --set is kept, in order, in `args.overrides`."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override config keys; repeatable, all apply in order (a later one wins on the same key)")
