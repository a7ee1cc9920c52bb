"""Supervised vs UDA-only vs MPL at one budget and seed: does the teacher's feedback help?

    mpl-fast bench methods [--config NAME|FILE] [--set KEY=VALUE ...] [--out DIR]
                           [--methods supervised,uda,mpl] [--resume] [--results DIR]
                           [--plot-only FIG]

Each method trains into OUT/<method>/ with the trainer on the same config (default
cifar10_4k_short), changed only by:
  supervised  method=supervised (the student on the labels alone)
  uda         mpl.mpl_weight=0: the teacher keeps its supervised and UDA losses and the student
              learns from its pseudo labels, but the teacher gets no feedback from the student
  mpl         the config as given
  mpl_joint   mpl.ce_old_forward=joint: MPL with CE_old from the student's joint forward on x_us
              and x_l, as the released code (docs/meta_gradient.md); run only when named
As each run ends one JSON object is appended to RESULTS/methods.jsonl (card, versions and date
of the session that finished it, final top-1 of the EMA student, student and teacher, wall
seconds, images/s, the share of the loop spent waiting for data, the last logged h, UDA mask
ratio and pseudo-label accuracy, their statistics over the run (`feedback`), the resolved MPL
settings, and the EMA-student and teacher top-1 curves), and OUT/methods.png draws the curves
so far (teachers dashed). With --resume a method continues from OUT/<method>/last.pt (runs can
span several sittings); a method whose run already reached its last step is not trained again.
A run saved with other settings than the ones given now (anything but where it runs and how
often it is evaluated, logged or saved) is refused, so one comparison never mixes
configurations.
--plot-only FIG trains and records nothing: it draws FIG from the runs already in OUT (e.g. runs
of one comparison finished in different GPU sittings, gathered in one folder), titled with the
config and the card(s) they finished on (their summaries, or their records in RESULTS).
"""
import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import textwrap
from pathlib import Path

import torch

METHODS = {
    "supervised": ["method=supervised"],
    "uda": ["mpl.mpl_weight=0"],
    "mpl": [],
    "mpl_joint": ["mpl.ce_old_forward=joint"],
}
LABELS = {"supervised": "Supervised", "uda": "UDA only (no feedback)", "mpl": "MPL",
          "mpl_joint": "MPL, CE_old from the joint forward"}
# What the record keeps of the last logged line of each run (diagnostics of the feedback).
LAST_LOGGED = ("h", "baseline", "uda/mask_ratio", "teacher/ce_labeled", "student/ce_new",
               "pseudo/accuracy")


def _from_metrics(run_dir):
    """From a run's metrics.jsonl: the EMA-student curve, the last logged diagnostics, h's
    statistics."""
    from mpl_fast.train.run_log import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    curve = [(r["step"], r["eval/ema_student_top1"]) for r in rows
             if "eval/ema_student_top1" in r]
    teacher = [(r["step"], r["eval/teacher_top1"]) for r in rows if "eval/teacher_top1" in r]
    last = {}
    for r in rows:
        last.update({k: r[k] for k in LAST_LOGGED if k in r})
    return curve, teacher, last, feedback_stats(rows)


def feedback_stats(rows):
    """h over a run's logged steps where the student learned (lr > 0; in its wait steps h says
    nothing of a step): how many, mean, std, the fraction below 0 (the student's step raised its
    labeled loss), and the means of h after the baseline, of the UDA mask ratio and of the pseudo
    labels' accuracy. None for a run without feedback logged (supervised)."""
    hs = [r for r in rows if "h" in r and r.get("lr/student", 0) > 0]
    if not hs:
        return None
    h = [r["h"] for r in hs]
    return {"logged_steps": len(h), "h_mean": statistics.fmean(h),
            "h_std": statistics.stdev(h) if len(h) > 1 else 0.0,
            "h_negative_fraction": sum(v < 0 for v in h) / len(h),
            "h_centered_mean": statistics.fmean(r.get("h_centered", 0.0) for r in hs),
            "mask_ratio_mean": statistics.fmean(r.get("uda/mask_ratio", 0.0) for r in hs),
            # how often the student's pseudo labels were right (None: a run before it was logged)
            "pseudo_accuracy_mean": (statistics.fmean(r["pseudo/accuracy"] for r in hs)
                                     if all("pseudo/accuracy" in r for r in hs) else None)}


# Keys that change where a run executes (config.EXECUTION_KEYS) or how it is watched, not what
# it learns: a run may be resumed with other values (another machine, more frequent evaluation).
NOT_COMPARED = {"train.log_every", "train.eval_every", "train.checkpoint_every",
                "train.eval_batch_size", "train.max_nonfinite_skips", "train.profile_steps",
                "train.profile_from"}


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _saved_config(run_dir):
    """The config a run trained with, from its config.yaml."""
    import yaml

    from mpl_fast.train import config as cfg

    return cfg.from_saved(yaml.safe_load((run_dir / "config.yaml").read_text()))


def _changed_settings(run_dir, config):
    """Keys whose value in the run's saved config.yaml differs from `config`: a comparison at
    one budget must not mix runs trained with other settings."""
    from mpl_fast.train import config as cfg

    saved = _flat(_saved_config(run_dir))
    now = _flat(config)
    keys = set(saved) | set(now)
    if config["method"] == "supervised":  # the MPL settings it does not use
        keys = {k for k in keys if not k.startswith("mpl.") or k == "mpl.student_label_smoothing"}
    return sorted(k for k in keys - NOT_COMPARED - cfg.EXECUTION_KEYS
                  if saved.get(k) != now.get(k))


def _finished(run_dir, steps):
    summary = run_dir / "summary.json"
    return summary.exists() and json.loads(summary.read_text())["steps"] >= steps


def _title(name, config, card):
    """What the curves were trained with: preset, student network, batches, steps, card."""
    d = config["data"]
    return (f"{name}: {config['model']['student']}, B={d['batch_size']}, mu={d['mu']}, "
            f"{config['train']['steps']} steps, {card}")


def plot(path, curves, title, teachers=None):
    """The EMA students' top-1 over steps, a line a method; `teachers` (method -> curve), where
    given, dashed in the method's colour."""
    import matplotlib

    from mpl_fast.train.run_log import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, points in curves.items():
        if points:
            line, = ax.plot(*zip(*points), marker="o", markersize=3, label=LABELS[method])
            teacher = (teachers or {}).get(method)
            if teacher:
                ax.plot(*zip(*teacher), linestyle="--", color=line.get_color(), alpha=0.7,
                        label=f"{LABELS[method]}: its teacher")
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 (EMA student; dashed: teacher)" if teachers else "EMA student top-1")
    ax.set_title("\n".join(textwrap.wrap(title, 72)), fontsize=10)  # long card lists wrap
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _card(summary, method, records):
    """The card a run finished on: its summary's, or for a run from before summaries named it,
    that of its record in methods.jsonl (same method, steps and final EMA top-1)."""
    if summary.get("device"):
        return summary["device"]
    for r in reversed(records):
        if (r.get("method"), r.get("steps"), r.get("ema_student_top1")) == (
                method, summary.get("steps"), summary.get("ema_student_top1")):
            return r.get("gpu")
    return None


def _cards_label(cards):
    """The title's cards (method -> card or None): the one card all runs share, or, for runs of
    one comparison finished on different machines, which methods ran on which."""
    by_card = {}
    for method, card in cards.items():
        if card:
            by_card.setdefault(card, []).append(method)
    if len(by_card) <= 1:
        return next(iter(by_card), "card not recorded")
    return "; ".join(f"{', '.join(methods)}: {card}" for card, methods in by_card.items())


def plot_runs(out, methods, name, config, path, results):
    """--plot-only: the figure from runs already in OUT, nothing trained or recorded; the title
    gives the first run's saved settings and the cards the runs finished on (RESULTS/methods.jsonl
    for runs whose summary does not)."""
    from mpl_fast.train.run_log import read_jsonl

    import matplotlib.figure

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"--plot-only: no folder {path.parent} for the figure")
    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:  # before reading any run
        raise ValueError(f"--plot-only {path}: name a figure file ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    curves, teachers, cards = {}, {}, {}
    listed = Path(results) / "methods.jsonl"
    records = read_jsonl(listed) if listed.is_file() else []
    for method in methods:
        run_dir = out / method
        if not (run_dir / "metrics.jsonl").is_file():
            raise ValueError(f"--plot-only: no run of {method} at {run_dir} (no metrics.jsonl)")
        curves[method], teachers[method], _, _ = _from_metrics(run_dir)
        summary = run_dir / "summary.json"
        if summary.is_file():
            cards[method] = _card(json.loads(summary.read_text()), method, records)
    card = _cards_label(cards)
    if (out / methods[0] / "config.yaml").is_file():  # the runs' settings, not --set's now
        config = _saved_config(out / methods[0])
    plot(path, curves, _title(name, config, card), teachers)
    print(f"{', '.join(methods)} from {out} -> {path}")
    return 0


def main(argv=None):
    from mpl_fast.data.sources import check_data_root
    from mpl_fast.train import config as cfg
    from mpl_fast.train.loop import check_out_dir, train
    from mpl_fast.train.run_log import append_jsonl, check_results_folder

    p = argparse.ArgumentParser(prog="mpl-fast bench methods",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cifar10_4k_short",
                   help="preset name or YAML file (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every method, e.g. data.root=DIR")
    p.add_argument("--methods", default="supervised,uda,mpl",
                   help="comma-separated subset of supervised,uda,mpl,mpl_joint "
                        "(default: %(default)s)")
    p.add_argument("--out", default="runs/methods", help="run folders (default: %(default)s)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue each method's run")
    again.add_argument("--overwrite", action="store_true",
                       help="train each method again over a run already in --out")
    p.add_argument("--results", default="benchmarks/results",
                   help="where methods.jsonl is appended (default: %(default)s)")
    p.add_argument("--plot-only", metavar="FIG",
                   help="train nothing: draw FIG (.png, .svg, .pdf, ...) from the runs "
                   "already in --out")
    args = p.parse_args(argv)
    if args.plot_only and (args.resume or args.overwrite):
        p.error("--plot-only trains nothing: it takes no --resume or --overwrite")
    if not args.plot_only:
        check_results_folder(p, "--results", args.results)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods: expected a subset of {','.join(METHODS)}, "
                         f"got {args.methods!r}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:  # the second run would find the first's folder after a whole training
        raise ValueError(f"--methods names {', '.join(twice)} twice")
    # Resolve every config before training anything, so a bad key fails in the first second.
    configs = {m: cfg.load(args.config, [*args.set, *METHODS[m]]) for m in methods}
    if args.plot_only:
        return plot_runs(Path(args.out), methods, args.config, configs[methods[0]],
                         args.plot_only, args.results)
    check_data_root(configs[methods[0]]["data"])  # the same data for every method
    out = Path(args.out)
    gpu = torch.cuda.is_available() and configs[methods[0]]["train"]["device"] != "cpu"
    card = torch.cuda.get_device_name() if gpu else "cpu"
    records, curves, teachers = [], {}, {}
    results = Path(args.results)
    title = _title(args.config, configs[methods[0]], card)
    for method in methods:  # refuse before training anything
        run_dir = out / method
        check_out_dir(run_dir, args.resume, args.overwrite)
        changed = args.resume and (run_dir / "config.yaml").exists() and _changed_settings(
            run_dir, configs[method])
        if changed:
            raise ValueError(f"--resume: {run_dir} was trained with other settings "
                             f"({', '.join(changed)}); remove it or train into another --out")
    for method in methods:
        config, run_dir = configs[method], out / method
        steps = config["train"]["steps"]
        if args.resume and _finished(run_dir, steps):
            print(f"{method}: already at step {steps}, not trained again", flush=True)
            summary = json.loads((run_dir / "summary.json").read_text())
        else:
            resume = args.resume and (run_dir / "last.pt").exists()
            print(f"{method}: {'resuming' if resume else 'training'} {steps} steps -> {run_dir}",
                  flush=True)
            summary = train(config, run_dir, resume=resume, overwrite=args.overwrite)
        curve, teacher, last, h_stats = _from_metrics(run_dir)
        curves[method], teachers[method] = curve, teacher
        record = {
            "method": method, "config": args.config, "overrides": args.set,
            "steps": summary["steps"], "seed": config["train"]["seed"],
            "labeled_per_class": config["data"]["labeled_per_class"],
            "batch_size": config["data"]["batch_size"], "mu": config["data"]["mu"],
            "ema_student_top1": summary["ema_student_top1"],
            "student_top1": summary["student_top1"], "teacher_top1": summary["teacher_top1"],
            "finetuned_student_top1": summary.get("finetuned_student_top1"),
            "seconds_last_sitting": summary["seconds_this_session"],
            "images_per_second": summary.get("images_per_second"),
            # the last sitting's share of loop time waiting for data (None: run before it existed)
            "data_wait_share": summary.get("data_wait_share"),
            "last_logged": last, "feedback": h_stats, "ema_student_top1_curve": curve,
            "teacher_top1_curve": teacher or None,  # None: supervised, no teacher
            # the MPL settings after the preset (null for supervised), e.g. ce_old_forward
            "mpl": (None if config["method"] == "supervised"
                    else dataclasses.asdict(cfg.mpl_config(config))),
            # the last session's, as its summary says (a run trained on a GPU machine and
            # recorded here names that card); runs from before summaries held them: this one's
            "gpu": summary.get("device", card), "torch": summary.get("torch", torch.__version__),
            "date": summary.get("date", datetime.date.today().isoformat()),
        }
        records.append(record)
        # recorded and drawn as each run ends: a command stopped in a later run (a GPU
        # machine's time limit) keeps what the finished ones measured
        append_jsonl(results / "methods.jsonl", [record])
        plot(out / "methods.png", curves, title, teachers)
        print(f"{method}: EMA student top-1 {summary['ema_student_top1']:.4f}", flush=True)
    print("summary: " + ", ".join(f"{r['method']} {r['ema_student_top1']:.4f}" for r in records)
          + f" (EMA student top-1) -> {out / 'methods.png'}, {results / 'methods.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
