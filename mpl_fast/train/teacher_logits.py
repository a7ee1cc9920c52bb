"""`mpl-fast logits`: a trained network's logits over its run's training and test splits, stored
once for Reduced MPL (model.teacher=reduced reads them; mpl_fast.data.logit_store).

Each image is seen as evaluation sees it (no augmentation), in the data's index order, so a
store's row i belongs to image i of the split: the rows the data sources name in each batch.
"""
import sys
import time
from pathlib import Path

import torch

from mpl_fast.data.logit_store import SPLITS, store_path, write_folder
from mpl_fast.train.loop import TrainError, run_from_checkpoint

NETWORKS = ("ema_student", "student", "teacher")


def _network(run, state, name, path):
    """(name, module): the network of the checkpoint to run; by default its EMA student, or the
    finetuned student of a finetuned.pt."""
    finetuned = "ema" not in state
    if name is None:
        name = "student" if finetuned else "ema_student"
    if finetuned and name != "student":
        raise TrainError(f"{path} holds a finetuned student alone: --network student")
    if name == "teacher" and (run.teacher is None or run.teacher_test_logits is not None):
        raise TrainError(f"{path} has no image teacher (method {run.config['method']}, teacher "
                         f"{run.config['model']['teacher']}): --network ema_student or student")
    return name, {"ema_student": run.ema.module if not finetuned else None,
                  "student": run.student, "teacher": run.teacher}[name]


def write(checkpoint, out, network=None, overrides=(), batch_size=None, overwrite=False,
          progress=None):
    """Write OUT/train.logits and OUT/test.logits (each with its .json), both or neither;
    returns (network name, {split: {"rows", "top1"}}): the network's top-1 on each split,
    measured on the way."""
    out = Path(out)
    existing = [store_path(out, split) for split in SPLITS if store_path(out, split).exists()]
    if existing and not overwrite:
        raise TrainError(f"{out} already holds teacher logits ({existing[0].name}): --overwrite "
                         "replaces them")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder")
    run, state, path = run_from_checkpoint(checkpoint, overrides)
    name, model = _network(run, state, network, path)
    batch_size = batch_size or run.config["train"]["eval_batch_size"]
    report = {}

    @torch.no_grad()
    def logits(split):
        labels = run.data.labels(split)
        hits, done, shown = 0, 0, time.monotonic()
        model.eval()
        for x, y in run.data.ordered_batches(split, batch_size, run.device):
            if run.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=run.amp, enabled=run.amp is not None):
                z = model(x).float()
            hits += int((z.argmax(1) == y).sum())
            done += len(y)
            if progress is not None and (time.monotonic() - shown > 5 or done == len(labels)):
                progress(f"logits: {split} {done}/{len(labels)}")
                shown = time.monotonic()
            yield z
        report[split] = {"rows": done, "top1": hits / max(done, 1)}

    meta = {"checkpoint": str(path), "step": state.get("step"), "network": name,
            "data": run.config["data"]}
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_folder(out, {split: (len(run.data.labels(split)), logits(split))
                           for split in SPLITS},
                     {split: {**meta, "fingerprint": run.data.fingerprint(split)}
                      for split in SPLITS})
    except OSError as err:
        raise TrainError(f"cannot write teacher logits to {out}: {err.strerror or err}") from err
    except ValueError as err:  # a split that yielded other than its images' count
        raise TrainError(f"teacher logits: {err}") from err
    finally:
        if made and out.is_dir() and not any(out.iterdir()):  # failed: no empty folder left
            out.rmdir()
    return name, report


def stderr_progress(message):
    print(message, file=sys.stderr, flush=True)
