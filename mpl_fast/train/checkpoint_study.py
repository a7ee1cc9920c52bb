"""What the scripts that study a run's checkpoint on its own data stream share
(benchmarks/pseudo_label_quality.py, benchmarks/bn_recalibration.py): their command line (a run
or checkpoint, N batches of its stream, --set, --out) and the errors they report in one line."""
import argparse


def parse_args(argv, prog: str, doc: str, results_file: str, batches: int, batches_help: str,
               add_arguments=None):
    """The study's arguments (add_arguments(parser) adds its own); its module docstring's third
    paragraph is the --help text. A bad --batches or an --out it cannot write to stops here,
    before any checkpoint is read."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder (its last.pt) or a last.pt / best.pt")
    p.add_argument("--batches", type=int, default=batches,
                   help=f"{batches_help} (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. data.root=DIR where the data now lives")
    p.add_argument("--out", default="benchmarks/results",
                   help=f"where {results_file} is appended (default: %(default)s)")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    from mpl_fast.train.run_log import check_results_folder

    check_results_folder(p, "--out", args.out)  # a file there failed after the measurement
    return args


def errors() -> tuple:
    """The exceptions a study reports in one line: bad settings, a checkpoint that does not load
    or holds the wrong run, data that is not where the run's config says."""
    from mpl_fast.data.image_folder import DataError
    from mpl_fast.train import checkpoint, config as cfg
    from mpl_fast.train.loop import TrainError

    return cfg.ConfigError, TrainError, checkpoint.CheckpointError, DataError
