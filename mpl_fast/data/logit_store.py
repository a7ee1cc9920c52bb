"""A memory-mapped fp16 store of a large teacher's logits over a data set (Reduced MPL)."""
import json
import os
from pathlib import Path

import numpy as np
import torch


class LogitStore:
    """Rows of logits, read from `<path>` (raw fp16, rows x classes) and `<path>.json`."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path.with_name(self.path.name + ".json")
        if not self.path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no logit store at {self.path} (and {meta_path.name})")
        meta = json.loads(meta_path.read_text())
        self.rows, self.classes = int(meta["rows"]), int(meta["classes"])
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
        return torch.from_numpy(np.ascontiguousarray(self._data[index]))


@torch.no_grad()
def precompute_logits(model: torch.nn.Module, inputs, path, batch_size: int = 256,
                      device="cpu") -> LogitStore:
    """Run `model` (eval mode) once over `inputs` (a tensor, rows first) and store its logits.

    Written to a temporary name and renamed, so an interrupted run leaves no partial store.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    tmp = path.with_name(path.name + ".tmp")
    rows, classes = len(inputs), None
    try:
        out = None
        for start in range(0, rows, batch_size):
            logits = model(inputs[start:start + batch_size].to(device)).float().cpu()
            if out is None:
                classes = logits.shape[1]
                out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(rows, classes))
            out[start:start + len(logits)] = logits.numpy().astype(np.float16)
        if out is None:
            raise ValueError("precompute_logits: no inputs")
        out.flush()
        del out
        meta = path.with_name(path.name + ".json")
        meta_tmp = meta.with_name(meta.name + ".tmp")
        meta_tmp.write_text(json.dumps({"rows": rows, "classes": classes, "dtype": "float16"}))
        os.replace(tmp, path)
        os.replace(meta_tmp, meta)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return LogitStore(path)
