"""Run logging: a live progress line, DIR/metrics.jsonl, TensorBoard events, a PNG of curves."""
import json
import os
import sys
import time
from pathlib import Path

SHOWN = (("teacher/loss", "t_loss"), ("student/loss", "s_loss"), ("h", "h"),
         ("uda/mask_ratio", "mask"), ("lr/student", "lr_s"), ("time/data_wait", "data_wait"))


def read_jsonl(path) -> list:
    """The JSON objects of a file of one a line (metrics.jsonl, a results record file)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class RunLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0,
                 images_per_step: int = 0, enabled: bool = True):
        self.out_dir, self.total, self.enabled = Path(out_dir), total_steps, enabled
        self.images_per_step = images_per_step
        self.path = self.out_dir / "metrics.jsonl"
        self.tb = None
        self.progress = self.task = None
        self._t0, self._s0 = time.time(), start_step
        if not enabled:
            return
        self._truncate_after(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a dependency; stay usable without it
            self.tb = None
        self.tty = sys.stderr.isatty()
        if self.tty:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.description}"), TimeRemainingColumn(),
                                     transient=False)
            self.progress.start()
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)

    def _truncate_after(self, step):
        """On resume, drop lines logged after the checkpoint: they are logged again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def images_per_second(self, step):
        elapsed = time.time() - self._t0
        return (step - self._s0) * self.images_per_step / elapsed if elapsed > 0 else 0.0

    def log(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        shown = " ".join(f"{short} {record[k]:.3g}" for k, short in SHOWN if k in record)
        shown += f" img/s {self.images_per_second(step):.0f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=shown)
        elif any(k.startswith("eval/") for k in record):
            print(f"step {step}/{self.total} {shown} " + " ".join(
                f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval/")),
                file=sys.stderr, flush=True)

    def log_finetune(self, step: int, loss: float):
        """The finetuning's loss at its step, into TensorBoard (`finetune/loss`, its own step
        axis); metrics.jsonl keeps the training steps alone."""
        if self.enabled and self.tb is not None:
            self.tb.add_scalar("finetune/loss", loss, step)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()


def check_results_folder(parser, flag, folder):
    """Prove the folder a benchmark appends its records to writable before the measurement: a
    bad --out stops in the first second with argparse's one-line error instead of after minutes
    of GPU time. The proof is a temporary file in the folder or, where it does not exist yet,
    in its nearest existing parent (append_jsonl makes the folder when there is a record), so a
    run that stops early leaves nothing behind."""
    import errno
    import tempfile

    folder = Path(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        parser.error(f"{flag} {folder}: cannot write there ({err.strerror or err})")


def check_device(parser, flag, name):
    """The torch device a benchmark's --device names, or argparse's one-line error for another
    kind than cpu and cuda or a CUDA device this machine does not have (before anything runs)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"{flag} {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.index is not None and device.index >= count or not count:
            parser.error(f"{flag} {name}: this machine has {count} CUDA device(s)")
    return device


def where_it_ran(device) -> dict:
    """The card (or "cpu"), torch and date of this session: what every record says it ran on."""
    import datetime

    import torch

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": card, "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def append_jsonl(path, records):
    """Append one JSON object per line to path (benchmark results, run records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def save_figure(fig, path, dpi=90):
    """Write a matplotlib figure atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def plot_curves(metrics_path: Path, png_path: Path):
    """Accuracy and losses over steps from metrics.jsonl, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("top1")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax1.plot(*zip(*pts), marker="o", label=key[5:])
    ax1.set_xlabel("step")
    ax1.set_ylabel("top-1")
    ax1.legend()
    for key in ("teacher/loss", "student/loss", "teacher/ce_labeled", "teacher/uda"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax2.plot(*zip(*pts), label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    save_figure(fig, png_path)
