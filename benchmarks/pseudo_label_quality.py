"""How good are the pseudo labels a run's student learns from?

    python benchmarks/pseudo_label_quality.py RUN_OR_CHECKPOINT [--batches N] [--set KEY=VALUE ...]
                                              [--teacher-bn eval|joint|apart|shared] [--out DIR]

An MPL (or UDA-only) student sees no labels until it is finetuned: it learns from labels its
teacher draws on the unlabeled images' strong views (the `paper` preset samples them from the
teacher's softmax; `mpl.pseudo_labels: argmax` takes the top class). The unlabeled images of a
labeled-subset split do have labels, which training never reads: this script draws N batches from
the run's own data stream (the augmentations it trained with), runs the checkpoint's teacher on
them and compares with those labels: the top-1 of the teacher on the weak and the strong view, the
expected accuracy of a label sampled from its softmax on the pseudo-label view at
mpl.pseudo_label_temperature (the mean probability of the true class: exact, no sampling noise),
the mean top probability there, and the UDA mask ratio (weak view, uda_temperature,
uda_threshold) with the top-1 of the rows it keeps. The teacher's BatchNorm layers normalise with
their running statistics (--teacher-bn eval, the default) or, as a training step does, with the
batch's statistics (running statistics left alone): of the labeled, weak and strong views
together (joint), or of the labeled and strong views together and the weak view apart (apart, as
with mpl.teacher_weak_no_grad=true), or of the labeled and strong views together, the weak view
apart normalised with them (shared, as with mpl.teacher_weak_no_grad=shared). One JSON line is
appended to OUT/pseudo_labels.jsonl with the checkpoint, its step, device, versions and date.
"""
import sys
from pathlib import Path

import torch

from mpl_fast.progress import ProgressLines
from mpl_fast.train import checkpoint_study as study


def label_quality(z_weak, z_strong, truth, *, temperature=1.0, uda_temperature=1.0,
                  threshold=0.0, view="strong"):
    """Sums over one batch (add them up over batches, then divide by `rows`): top-1 hits on each
    view, the pseudo-label view's probability of the true class and top probability, the UDA
    mask's rows and their top-1 hits. Logits N x C (any float dtype, read in float64), truth N."""
    z_weak, z_strong = z_weak.double(), z_strong.double()
    source = z_strong if view == "strong" else z_weak
    p = torch.softmax(source / temperature, dim=1)
    weak_p = torch.softmax(z_weak / uda_temperature, dim=1)
    kept = weak_p.max(dim=1).values >= threshold
    weak_hit = z_weak.argmax(dim=1) == truth
    return {"rows": len(truth),
            "weak_top1": weak_hit.sum().item(),
            "strong_top1": (z_strong.argmax(dim=1) == truth).sum().item(),
            "sampled_label_accuracy": p.gather(1, truth[:, None]).sum().item(),
            "top_probability": p.max(dim=1).values.sum().item(),
            "uda_mask_ratio": kept.sum().item(),
            "uda_kept_top1": (weak_hit & kept).sum().item(), "uda_kept_rows": kept.sum().item()}


def finish(sums):
    """Rates from summed counts: per row, except the kept rows' top-1 (per kept row; None when
    the mask kept none)."""
    rows, kept = sums["rows"], sums["uda_kept_rows"]
    out = {k: v / rows for k, v in sums.items() if k not in ("rows", "uda_kept_top1",
                                                             "uda_kept_rows")}
    out["uda_kept_top1"] = sums["uda_kept_top1"] / kept if kept else None
    out["rows"] = rows
    return out


# --teacher-bn: how the teacher's BatchNorm layers normalise (the record's `teacher_bn`)
TEACHER_BN = {"eval": "eval (running statistics)",
              "joint": "batch statistics, labeled, weak and strong views together",
              "apart": "batch statistics, labeled and strong views together, weak view apart",
              "shared": "batch statistics, labeled and strong views together, weak view apart "
                        "normalised with theirs"}


def teacher_logits(teacher, batch, bn):
    """The teacher's logits on the weak and strong views, its BatchNorm layers as --teacher-bn
    says (batch statistics: running statistics left as they are)."""
    from mpl_fast.mpl.bn import frozen_bn_stats
    from mpl_fast.mpl.step import teacher_views

    if bn == "eval":
        teacher.eval()
        _, t_uw, t_us = batch.teacher_inputs()
        return teacher(t_uw), teacher(t_us)
    teacher.train()
    with frozen_bn_stats(teacher):
        _, z_uw, z_us = teacher_views(teacher, batch,
                                      weak_no_grad={"joint": False, "apart": True}.get(bn, bn))
    return z_uw, z_us


def _add_arguments(parser):
    parser.add_argument("--teacher-bn", choices=sorted(TEACHER_BN), default="eval",
                        help="the teacher's BatchNorm: running statistics (eval), or a training "
                        "step's batch statistics with the weak view in the batch (joint), apart "
                        "(apart), or apart normalised with the other views' statistics (shared) "
                        "(default: %(default)s)")


def main(argv=None):
    args = study.parse_args(sys.argv[1:] if argv is None else argv, "pseudo_label_quality.py",
                            __doc__, "pseudo_labels.jsonl", 20,
                            "unlabeled batches of the run's stream", _add_arguments)
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import TrainError, run_from_checkpoint
    from mpl_fast.train.run_log import append_jsonl, where_it_ran

    try:
        run, state, path = run_from_checkpoint(args.checkpoint, args.set)
        if "ema" not in state or run.teacher is None:
            raise TrainError(f"{path} holds no teacher: a last.pt or best.pt of an MPL run")
        if run.config["model"]["teacher"] == cfg.REDUCED:
            raise TrainError(f"{path}: a reduced teacher labels stored logits, not images")
        c = cfg.mpl_config(run.config)
        sums = None
        with torch.no_grad(), torch.autocast(run.device.type, dtype=run.amp,
                                             enabled=run.amp is not None):
            progress = ProgressLines("teacher on", unit="unlabeled batches",
                                     silent_if_quick=True)
            for i in range(args.batches):
                batch = run.to_device(run.data.next())  # y_u: the unlabeled rows' classes
                z_uw, z_us = teacher_logits(run.teacher, batch, args.teacher_bn)
                part = label_quality(z_uw, z_us, batch.y_u,
                                     temperature=c.pseudo_label_temperature,
                                     uda_temperature=c.uda_temperature,
                                     threshold=c.uda_threshold, view=c.pseudo_label_view)
                sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
                progress(i + 1, args.batches)
    except study.errors() as err:
        print(f"pseudo_label_quality: {err}", file=sys.stderr)
        return 2
    record = {"checkpoint": str(path), "step": state.get("step"),
              "method": run.config["method"], "mpl_weight": c.mpl_weight,
              "pseudo_labels": c.pseudo_labels, "pseudo_label_view": c.pseudo_label_view,
              "pseudo_label_temperature": c.pseudo_label_temperature,
              "uda_temperature": c.uda_temperature, "uda_threshold": c.uda_threshold,
              **finish(sums), "teacher_bn": TEACHER_BN[args.teacher_bn],
              **where_it_ran(run.device)}
    out = Path(args.out)
    append_jsonl(out / "pseudo_labels.jsonl", [record])
    print(", ".join(f"{k} {record[k]:.4f}" for k in
                    ("weak_top1", "strong_top1", "sampled_label_accuracy", "top_probability",
                     "uda_mask_ratio") if record[k] is not None)
          + f" over {record['rows']} unlabeled images -> {out / 'pseudo_labels.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
