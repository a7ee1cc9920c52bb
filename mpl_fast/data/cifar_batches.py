"""CIFAR-10/100 in the python-pickle format users already have from torchvision
(`cifar-10-batches-py/` or `cifar-100-python/`), as in-memory arrays for DALI."""
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np

from mpl_fast.data.image_folder import DataError


@dataclass
class ArrayIndex:
    """Like FolderIndex, with the decoded images in memory instead of file paths."""
    root: str
    images: np.ndarray  # N x 32 x 32 x 3 uint8
    labels: List[int]
    classes: List[str]
    skipped: List[tuple] = field(default_factory=list)

    def __len__(self):
        return len(self.labels)


def _unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"cannot read CIFAR batch {path} ({type(err).__name__})") from err


def _arrays(batches, label_key):
    data = np.concatenate([b[b"data"] for b in batches])
    labels = sum((list(b[label_key]) for b in batches), [])
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError("CIFAR batch has an unexpected layout (want N x 3072 uint8 and N labels)")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def load(root):
    """(train, test) ArrayIndex from a cifar-10-batches-py or cifar-100-python folder."""
    root = Path(root)
    if (root / "data_batch_1").exists():
        meta = _unpickle(root / "batches.meta")
        classes = [c.decode() for c in meta[b"label_names"]]
        train = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
        test, key = [_unpickle(root / "test_batch")], b"labels"
    elif (root / "train").is_file():
        meta = _unpickle(root / "meta")
        classes = [c.decode() for c in meta[b"fine_label_names"]]
        train, test, key = [_unpickle(root / "train")], [_unpickle(root / "test")], b"fine_labels"
    else:
        raise DataError(f"{root} holds neither cifar-10-batches-py nor cifar-100-python files")
    out = []
    for batches in (train, test):
        images, labels = _arrays(batches, key)
        out.append(ArrayIndex(str(root.resolve()), images, labels, classes))
    return out[0], out[1]
