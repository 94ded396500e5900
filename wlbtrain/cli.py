"""``wlbtrain`` command line: train, prepare, plan.

Bad input ends with one line on stderr naming the problem and exit status 2, before any
process group starts or any run file is written.
"""

from __future__ import annotations

import argparse
import sys

from .config import EXIT_BAD_INPUT, ConfigError
from .data.store import StoreError



def _train(args) -> int:
    from .config import load_config
    from .train import preflight, train

    cfg = load_config(args.recipe, args.overrides)
    if args.check:
        ready = preflight(cfg)
        print(f"ok: {args.recipe}: {ready.dims.describe(0)}, {ready.store.num_docs} documents, "
              f"resume from {ready.resume_path or 'scratch'}")
        return 0
    train(cfg)
    return 0


def _parser() -> argparse.ArgumentParser:
    from .data import prepare
    from . import plan

    parser = argparse.ArgumentParser(prog="wlbtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a recipe (under torchrun or alone)")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/debug.yaml")
    train.add_argument("overrides", nargs="*", metavar="section.key=value")
    train.add_argument("--check", action="store_true",
                       help="validate recipe, data, layout and resume point; start nothing")
    train.set_defaults(run=_train)

    prep = commands.add_parser("prepare", help="text, directories or JSONL → a token store")
    prepare.add_arguments(prep)
    prep.set_defaults(run=prepare.run)

    plan_cmd = commands.add_parser("plan", help="run the packers on a recipe's data; report balance")
    plan.add_arguments(plan_cmd)
    plan_cmd.set_defaults(run=plan.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, StoreError) as err:
        print(f"wlbtrain {args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
