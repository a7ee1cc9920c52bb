"""Do a run's BatchNorm running statistics suit its networks at test time?

    python benchmarks/bn_recalibration.py RUN_OR_CHECKPOINT [--batches N] [--set KEY=VALUE ...]
                                          [--out DIR]

A network is tested with the BatchNorm running statistics it gathered in training: an MPL
student's come from the strong (RandAugment + cutout) views it learns on, the teacher's from
its own training forward, each an average with momentum (model.bn_momentum) that trails weights
still moving. This script tests the checkpoint's student, EMA student and teacher on the test
split as saved, then with the running statistics recomputed (torch.optim.swa_utils.update_bn:
a plain average over the batches, the weights untouched) on N batches of each view the run
draws from its own stream: labeled, unlabeled weak and unlabeled strong (a supervised run: the
labeled view alone). A large gain from recomputing says the statistics, not the weights, held
a network back; which view's statistics test best says which inputs the saved ones resemble.
One JSON line is appended to OUT/bn_recalibration.jsonl with the checkpoint, its step, device,
versions and date.
"""
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from mpl_fast.models.compiling import eager_copy
from mpl_fast.progress import ProgressLines
from mpl_fast.train import checkpoint_study as study

VIEWS = ("labeled", "weak", "strong")


def recomputed(model, batches, autocast_dtype=None):
    """A copy of model, in evaluation mode, whose BatchNorm running statistics are the average
    over `batches` (input tensors) of their batch statistics; model itself is left as it was
    (one compiled in place too: the copy runs eagerly)."""
    copied = eager_copy(model)
    device = next(copied.parameters()).device
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        update_bn(batches, copied)
    return copied.eval()


def view_batches(run, count):
    """{view: [count input batches]} from the run's own stream, in the augmentations it trained
    with: the student's views (labeled, unlabeled weak and strong), or the labeled view alone
    for a supervised run."""
    supervised = run.config["method"] == "supervised"
    views = {name: [] for name in (VIEWS[:1] if supervised else VIEWS)}
    progress = ProgressLines("drawn:", unit="batches", silent_if_quick=True)
    for i in range(count):
        batch = run.to_device(run.data.next_labeled() if supervised else run.data.next())
        for name, x in zip(VIEWS, (batch.x_l, batch.x_uw, batch.x_us)):
            if name in views:
                views[name].append(x)
        progress(i + 1, count)
    return views


def main(argv=None):
    args = study.parse_args(sys.argv[1:] if argv is None else argv, "bn_recalibration.py",
                            __doc__, "bn_recalibration.jsonl", 40,
                            "batches of the run's stream a view")
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import TrainError, run_from_checkpoint
    from mpl_fast.train.run_log import append_jsonl, where_it_ran

    try:
        # tested eagerly (a GPU run's model.compile would only add compiling here), unless --set
        # says otherwise
        run, state, path = run_from_checkpoint(args.checkpoint, ["model.compile=none", *args.set])
        if "ema" not in state:
            raise TrainError(f"{path} holds the finetuned student alone: a last.pt or best.pt "
                             f"of a run")
        networks = {"student": run.student, "ema_student": run.ema.module}
        if run.teacher is not None and run.config["model"]["teacher"] != cfg.REDUCED:
            networks["teacher"] = run.teacher  # a reduced teacher reads logits, not images
        views = view_batches(run, args.batches)
        tested = {}
        for name, net in networks.items():
            tested[name] = net.eval()
            for view, batches in views.items():
                tested[f"{name}@{view}"] = recomputed(net, batches, run.amp)
        accs = run.evaluate(tested, progress=ProgressLines(f"{len(tested)} networks tested on",
                                                           unit="test images"))
    except study.errors() as err:
        print(f"bn_recalibration: {err}", file=sys.stderr)
        return 2
    columns = ("saved",) + tuple(views)
    top1 = {name: {column: accs[f"eval/{name if column == 'saved' else name + '@' + column}_top1"]
                   for column in columns} for name in networks}
    record = {"checkpoint": str(path), "step": state.get("step"), "method": run.config["method"],
              "bn_momentum": run.config["model"]["bn_momentum"], "batches": args.batches,
              "images_per_view": {view: sum(len(x) for x in batches)
                                  for view, batches in views.items()},
              "top1": top1, **where_it_ran(run.device)}
    out = Path(args.out)
    append_jsonl(out / "bn_recalibration.jsonl", [record])
    print(f"top-1, running statistics as saved and recomputed on {args.batches} batches a view "
          f"(step {record['step']}):")
    print(f"{'':12s}" + "".join(f"{column:>9s}" for column in columns))
    for name, row in top1.items():
        print(f"{name:12s}" + "".join(f"{row[column]:9.4f}" for column in columns))
    print(f"-> {out / 'bn_recalibration.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
