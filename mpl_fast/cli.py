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


def _parse_value(text):
    import yaml

    return yaml.safe_load(text)


def _mpl_config(preset_name, overrides):
    from mpl_fast.mpl import PRESETS, MPLConfig

    if preset_name not in PRESETS:
        raise CliError(f"unknown preset {preset_name!r}; choose one of {', '.join(sorted(PRESETS))}")
    fields = set(MPLConfig.__dataclass_fields__)
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise CliError(f"--set {key}: unknown MPL setting")
        changes[key] = _parse_value(value)
    try:
        return PRESETS[preset_name].replace(**changes)
    except (ValueError, TypeError) as err:
        raise CliError(str(err)) from err


def _two_moons(args):
    from pathlib import Path

    from mpl_fast.train import two_moons

    if args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    config = _mpl_config(args.preset, args.set)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create --out {out}: {err.strerror}") from err
    metrics, data, models = two_moons.run(args.seed, steps=args.steps, lr=args.lr, config=config,
                                          progress=lambda msg: print(msg, flush=True))
    two_moons.write_json(out / "metrics.json", metrics)
    two_moons.plot(out / "two_moons.png", data, models, metrics)
    print(f"supervised {metrics['supervised_acc']:.3f}  pseudo labels "
          f"{metrics['pseudo_label_acc']:.3f}  MPL {metrics['mpl_acc']:.3f}  -> {out}")
    return 0


def _bench(args):
    import runpy
    from pathlib import Path

    if args.what != "ops":
        raise CliError(f"`mpl-fast bench {args.what}` is not built yet")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ops.py"
    if not script.exists():
        raise CliError(f"{script} not found: `bench` runs from a source checkout")
    module = runpy.run_path(str(script))
    return module["main"](args.rest)


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
    p = sub.add_parser("bench", help="benchmarks: ops (step and data are not built yet)",
                       description="`mpl-fast bench ops [options]` runs benchmarks/bench_ops.py "
                       "(see its --help); `step` and `data` are not built yet.")
    p.add_argument("what", choices=["ops", "step", "data"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(run=_bench)
    p = sub.add_parser("two-moons", help="the paper's TwoMoons illustration",
                       description="Supervised vs Pseudo Labels vs MPL on two moons (2000 points, "
                       "6 labeled). Writes OUT/metrics.json and OUT/two_moons.png.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/two_moons", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000, help="steps per method (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--preset", default="paper", help="MPL preset (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an MPL setting, e.g. --set estimator=dot")
    p.set_defaults(run=_two_moons)
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
