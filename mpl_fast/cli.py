"""The `mpl-fast` command line."""
import argparse
import sys

from mpl_fast import __version__


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _not_built(name):
    def run(args):
        raise CliError(f"`mpl-fast {name}` is not built yet")
    return run


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mpl-fast",
        description="Meta Pseudo Labels, fast: train, evaluate and benchmark MPL.")
    parser.add_argument("--version", action="version", version=f"mpl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train MPL (default: the embedded digits preset)")
    p.set_defaults(run=_not_built("train"))
    p = sub.add_parser("eval", help="evaluate a checkpoint")
    p.set_defaults(run=_not_built("eval"))
    p = sub.add_parser("bench", help="benchmarks: ops, step or data")
    p.add_argument("what", choices=["ops", "step", "data"])
    p.set_defaults(run=_not_built("bench"))
    p = sub.add_parser("two-moons", help="the paper's TwoMoons illustration")
    p.set_defaults(run=_not_built("two-moons"))
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except CliError as err:
        print(f"mpl-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mpl-fast: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
