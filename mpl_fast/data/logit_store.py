"""A memory-mapped fp16 store of a large teacher's logits over a data set (Reduced MPL), and the
data source that hands them out with each MPL batch."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mpl_fast.mpl.step import MPLBatch


class LogitStore:
    """Rows of logits, read from `<path>` (raw fp16, rows x classes) and `<path>.json`."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path.with_name(self.path.name + ".json")
        if not self.path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no logit store at {self.path} (and {meta_path.name})")
        self.meta = json.loads(meta_path.read_text())
        self.rows, self.classes = int(self.meta["rows"]), int(self.meta["classes"])
        expected = self.rows * self.classes * 2
        if self.path.stat().st_size != expected:
            raise ValueError(f"logit store {self.path} holds {self.path.stat().st_size} bytes, "
                             f"expected {expected} for {self.rows} x {self.classes} fp16")
        self._data = np.memmap(self.path, dtype=np.float16, mode="r",
                               shape=(self.rows, self.classes))

    def __len__(self):
        return self.rows

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        return torch.from_numpy(np.array(self._data[index]))  # a copy: the map is read-only


def write_logits(path, rows: int, logit_batches, meta=None) -> LogitStore:
    """Store `rows` rows of logits given in order as float batches (rows x classes), with `meta`
    beside them. Written to temporary names and renamed, so an interrupted write leaves no
    partial store."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta_path = path.with_name(path.name + ".json")
    meta_tmp = meta_path.with_name(meta_path.name + ".tmp")
    try:
        out, written = None, 0
        for logits in logit_batches:
            logits = logits.detach().float().cpu()
            if out is None:
                out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(rows, logits.shape[1]))
            if written + len(logits) > rows:
                raise ValueError(f"write_logits: more than the {rows} rows announced")
            out[written:written + len(logits)] = logits.numpy().astype(np.float16)
            written += len(logits)
        if out is None or written != rows:
            raise ValueError(f"write_logits: {written} rows given, {rows} announced")
        classes = out.shape[1]
        out.flush()
        del out
        meta_tmp.write_text(json.dumps({**(meta or {}), "rows": rows, "classes": classes,
                                        "dtype": "float16"}) + "\n")
        os.replace(tmp, path)
        os.replace(meta_tmp, meta_path)
    finally:
        for leftover in (tmp, meta_tmp):
            leftover.unlink(missing_ok=True)
    return LogitStore(path)


@torch.no_grad()
def precompute_logits(model: torch.nn.Module, inputs, path, batch_size: int = 256,
                      device="cpu") -> LogitStore:
    """Run `model` (eval mode) once over `inputs` (a tensor, rows first) and store its logits."""
    if len(inputs) == 0:
        raise ValueError("precompute_logits: no inputs")
    was_training = model.training
    model.eval()
    try:
        return write_logits(path, len(inputs), (
            model(inputs[start:start + batch_size].to(device))
            for start in range(0, len(inputs), batch_size)))
    finally:
        model.train(was_training)


# A teacher-logits folder (`mpl-fast logits`): one store a split, rows in the data's index order.
SPLITS = ("train", "test")


def store_path(folder, split) -> Path:
    return Path(folder) / f"{split}.logits"


def write_folder(folder, splits, meta=None):
    """Write the stores of `splits` ({split: (rows, logit batches)}) with their `meta`
    ({split: dict}) into `folder`: all of them or, if one fails or is interrupted, none (they are
    written aside first)."""
    folder = Path(folder)
    aside = folder / ".partial"
    shutil.rmtree(aside, ignore_errors=True)
    try:
        for split, (rows, batches) in splits.items():
            write_logits(store_path(aside, split), rows, batches,
                         {**(meta or {}).get(split, {}), "split": split})
        for split in splits:
            for name in (store_path(aside, split).name, store_path(aside, split).name + ".json"):
                os.replace(aside / name, folder / name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


class WithStoredLogits:
    """A data source whose MPL batches also carry a large teacher's stored logits for their rows
    (MPLBatch.teacher_l / teacher_uw / teacher_us: Reduced MPL's teacher inputs). The source
    names each batch's rows (`labeled_index`, `unlabeled_index`: rows of the training set, the
    order of the store). Both unlabeled views get the same stored row: the large teacher saw
    each image once, without augmentation."""

    def __init__(self, data, train_store: LogitStore):
        self.data, self.store = data, train_store

    def next(self) -> MPLBatch:
        batch = self.data.next()
        batch.teacher_l = self.store[batch.labeled_index]
        batch.teacher_uw = batch.teacher_us = self.store[batch.unlabeled_index]
        return batch

    def __getattr__(self, name):  # everything else is the source's
        return getattr(self.data, name)
