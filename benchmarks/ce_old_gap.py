"""How much of MPL's feedback h comes from where CE_old is computed (mpl.ce_old_forward).

    python benchmarks/ce_old_gap.py --root DIR [--config cifar10_4k_short] [--set KEY=VALUE ...]
                                    [--warmup-steps K] [--trials T] [--lr LR]
                                    [--device cpu|cuda] [--out DIR]

h = CE_old - CE_new is meant to be the change that one student step made to the student's
labeled loss. CE_new comes from a forward of x_l alone (BatchNorm normalises it with x_l's own
batch statistics). The released code and the PyTorch port take CE_old from the student's training
forward on x_us and x_l together, where x_l is normalised with the joint batch's statistics: their
h then also holds gap = CE_old(joint) - CE_old(x_l alone), which has nothing to do with the step
or the pseudo labels. This script measures, on real batches of the config's data pipeline
(RandAugment strong views), a student first trained for K supervised steps on the labeled stream
and a teacher stand-in (pseudo labels sampled from that student's softmax on x_us), over T
batches: h with CE_old from its own forward ('separate'), h from the joint forward ('joint'), and
their difference. Each trial steps a copy of the student by plain SGD at LR on its pseudo-label
loss (the part of an update that depends on this step's labels), the gradient taken from the
joint forward so that both h share one update and differ by the gap alone. The spread of `gap`
against the spread of h_separate says how much of the joint h is noise from normalisation. One
JSON line is appended to OUT/ce_old_gap.jsonl with device, versions, date, settings and the
statistics.
"""
import argparse
import copy
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ce_old_gap.py", description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="JPEG tree (root/train, root/test)")
    p.add_argument("--config", default="cifar10_4k_short",
                   help="preset or YAML file giving data and model (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as in mpl-fast train (repeatable)")
    p.add_argument("--warmup-steps", type=int, default=150,
                   help="supervised steps before the trials (default: %(default)s)")
    p.add_argument("--trials", type=int, default=12, help="batches measured (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="the trial step's SGD learning rate (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--out", default="benchmarks/results", help="(default: %(default)s)")
    args = p.parse_args(argv)
    if args.warmup_steps < 0:
        p.error("--warmup-steps must be >= 0")
    if args.trials < 2:
        p.error("--trials must be >= 2")  # a spread needs two values
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be finite and > 0, got {args.lr}")
    from mpl_fast.train.run_log import check_device, check_results_folder

    check_results_folder(p, "--out", args.out)
    check_device(p, "--device", args.device)
    return args


def _dali_version():
    import nvidia.dali

    return nvidia.dali.__version__


def labeled_ce(net, x, y):
    return F.cross_entropy(net(x).float(), y)


def main(argv=None):
    args = parse_args(argv)
    from mpl_fast.data.sources import DataError, build_data, check_data_root
    from mpl_fast.models.registry import build_model
    from mpl_fast.mpl.bn import frozen_bn_stats
    from mpl_fast.train import config as cfg
    from mpl_fast.train.run_log import append_jsonl

    try:
        config = cfg.load(args.config, [f"data.root={args.root}", *args.set])
        check_data_root(config["data"])
    except (cfg.ConfigError, DataError) as err:
        print(f"ce_old_gap: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    data = build_data(config["data"], seed=0, device=device)
    student = build_model(config["model"]["student"], data.num_classes, data.in_channels,
                          config["data"]["image_size"]).to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    t0 = time.time()
    for i in range(args.warmup_steps):
        b = data.next_labeled()
        loss = labeled_ce(student, b.x_l, b.y_l)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % 25 == 0 or i + 1 == args.warmup_steps:
            print(f"warm-up {i + 1}/{args.warmup_steps}: labeled CE {loss.item():.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for t in range(args.trials):
        b = data.next()
        s = copy.deepcopy(student)
        step = torch.optim.SGD(s.parameters(), lr=args.lr)
        n_u = b.x_us.shape[0]
        with frozen_bn_stats(s):
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(s(b.x_us).float(), 1), 1,
                                           generator=gen).squeeze(1)
                ce_old_separate = labeled_ce(s, b.x_l, b.y_l)
            z = s(torch.cat([b.x_us, b.x_l])).float()
            ce_old_joint = F.cross_entropy(z[n_u:], b.y_l).detach()
            step.zero_grad(set_to_none=True)
            F.cross_entropy(z[:n_u], labels).backward()
            step.step()
            with torch.no_grad():
                ce_new = labeled_ce(s, b.x_l, b.y_l)
        row = {"h_separate": float(ce_old_separate - ce_new),
               "h_joint": float(ce_old_joint - ce_new),
               "gap": float(ce_old_joint - ce_old_separate)}
        rows.append(row)
        print(f"trial {t + 1}/{args.trials}: " + "  ".join(f"{k} {v:+.5f}" for k, v in row.items()),
              flush=True)
    stats = {}
    for key in ("h_separate", "h_joint", "gap"):
        values = [r[key] for r in rows]
        stats[key] = {"mean": round(statistics.fmean(values), 6),
                      "std": round(statistics.stdev(values), 6)}
    ratio = (stats["h_joint"]["std"] / stats["h_separate"]["std"]) ** 2
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dali": _dali_version(),
        "date": datetime.date.today().isoformat(), "config": args.config,
        "model": config["model"]["student"],
        "batch_size": config["data"]["batch_size"], "mu": config["data"]["mu"],
        "warmup_steps": args.warmup_steps, "trials": args.trials, "lr": args.lr,
        **stats, "variance_ratio_joint_to_separate": round(ratio, 3), "trial_values": rows,
    }
    out = Path(args.out)
    append_jsonl(out / "ce_old_gap.jsonl", [record])
    print(f"summary: std of h {stats['h_separate']['std']:.5f} (separate) vs "
          f"{stats['h_joint']['std']:.5f} (joint), gap std {stats['gap']['std']:.5f}: the joint "
          f"forward's h has {ratio:.1f}x the variance -> {out / 'ce_old_gap.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
