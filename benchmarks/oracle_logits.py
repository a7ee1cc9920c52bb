"""A teacher that knows every answer, for Reduced MPL: what can right labels give a student?

    python benchmarks/oracle_logits.py --out DIR [--config NAME|FILE] [--set KEY=VALUE ...]
                                       [--margin M] [--overwrite]

Writes DIR/train.logits and DIR/test.logits (as `mpl-fast logits` does, both or neither) holding
each image's true class as logits: M for its class, 0 for the others. Reduced MPL
(`model.teacher=reduced`) starts its teacher out predicting exactly the stored logits, so over
this store the student's pseudo labels are the images' true labels (a label sampled at
temperature 1 is wrong with probability (C - 1) / (e^M + C - 1): 2e-8 for M 20 and 10 classes),
drawn for the same images and strong views as an MPL student's. Train with the run's settings
plus `--set model.teacher=reduced --set model.teacher_logits=DIR --set mpl.mpl_weight=0 --set
mpl.uda_weight=0 --set mpl.teacher_supervised_weight=0`: without a loss the teacher stays the
store (trained on the labels with smoothing 0.15 it learns to spread 15% of its probability
over the other classes, and its sampled labels with it), and the student learns right labels on
the strong views: the ceiling of what pseudo labels give a student at the run's budget
(docs/cifar10.md). Give the same --config and data settings as the run: the store is tied to
the images of each split and their order.
"""
import argparse
import sys
from pathlib import Path

import torch


def oracle_batches(labels: torch.Tensor, classes: int, margin: float, rows: int = 4096):
    """The store's logits for `labels` (int64, index order), `rows` at a time: margin at each
    image's class, 0 elsewhere."""
    for start in range(0, len(labels), rows):
        yield torch.nn.functional.one_hot(labels[start:start + rows], classes).float() * margin


def parse_args(argv):
    p = argparse.ArgumentParser(prog="oracle_logits.py", description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder of the two stores")
    p.add_argument("--config", default="digits", help="the run's preset or YAML file "
                   "(default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="the run's config overrides that choose its data, e.g. data.root=DIR")
    p.add_argument("--margin", type=float, default=20.0,
                   help="the true class's logit, the others' being 0 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace stores already in --out")
    args = p.parse_args(argv)
    if not args.margin > 0:
        p.error(f"--margin must be > 0, got {args.margin}")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mpl_fast.data.image_folder import DataError
    from mpl_fast.data.logit_store import SPLITS, write_folder
    from mpl_fast.data.sources import build_data
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import TrainError
    from mpl_fast.train.teacher_logits import check_store_folder

    out = Path(args.out)
    made = not out.exists()
    try:
        check_store_folder(out, args.overwrite)
        conf = cfg.load(args.config, args.set)
        # the run's data source alone: its splits' labels and fingerprints are the same whatever
        # the seed or device
        data = build_data(conf["data"], 0, torch.device("cpu"))
        meta = {s: {"model": f"oracle (true classes, margin {args.margin:g})",
                    "data": conf["data"], "fingerprint": data.fingerprint(s)} for s in SPLITS}
        labels = {s: data.labels(s) for s in SPLITS}
        out.mkdir(parents=True, exist_ok=True)
        write_folder(out, {s: (len(labels[s]), oracle_batches(labels[s], data.num_classes,
                                                              args.margin))
                           for s in SPLITS}, meta)
    except (cfg.ConfigError, TrainError, DataError) as err:
        print(f"oracle_logits: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"oracle_logits: cannot write to {out}: {err.strerror or err}", file=sys.stderr)
        return 2
    finally:
        if made and out.is_dir() and not any(out.iterdir()):  # failed: no empty folder left
            out.rmdir()
    print(f"oracle logits for {len(labels['train'])} training and {len(labels['test'])} test "
          f"images of {data.num_classes} classes -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
