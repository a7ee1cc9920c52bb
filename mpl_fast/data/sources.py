"""The data a run trains on, behind one small interface the trainer uses:

    next() -> MPLBatch, state_dict(), load_state_dict(), eval_batches() -> the (x, y) batches
    of the test set this replica evaluates (eval_share: all of them in one process),
    num_classes, in_channels, image_size, describe() -> what to save with the run,
    ordered_batches(split, rows=None) -> the (x, y) batches of a split (or of its rows) in
    index order, unaugmented,
    labels(split) -> its class labels in that order, fingerprint(split) -> a hash of the
    split's images (names, or pixels where there are no files) and labels in that order.
An MPL batch names its rows of the training set (batch.labeled_index, batch.unlabeled_index).
"""
import dataclasses
import hashlib
import os

from mpl_fast.data.digits import digits
from mpl_fast.data.image_folder import (DataError, all_of_size, balanced_split, index_folder,
                                        split_from_list)
from mpl_fast.data.stream import InMemoryStream


def eval_share(n, batch_size, rank, world):
    """The rows of an n-image test set that replica `rank` of `world` evaluates: its batches
    rank, rank + world, ... of the set cut into batch_size. Under torchrun each replica decodes
    and runs only those, and the batches are the ones one process would run (the same images
    together, so the same results to the last bit)."""
    return [row for start in range(rank * batch_size, n, world * batch_size)
            for row in range(start, min(start + batch_size, n))]


def _rows_of(index, rows):
    """The index (FolderIndex or ArrayIndex) of `rows` of `index`, in that order."""
    labels = [index.labels[i] for i in rows]
    if hasattr(index, "images"):
        return dataclasses.replace(index, images=index.images[rows], labels=labels)
    return dataclasses.replace(index, files=[index.files[i] for i in rows], labels=labels)


class DigitsData:
    def __init__(self, d, seed, rank=0, world=1):
        self.rank, self.world = rank, world
        self.split = digits(d["labeled_per_class"], d["test_fraction"], d["split_seed"])
        self.stream = InMemoryStream(self.split, d["batch_size"], d["mu"], seed=seed,
                                     pad=d["pad"], hflip=d["hflip"], cutout=d["cutout"],
                                     strength=d["strong_strength"], rank=rank, world=world)
        self.num_classes = self.split.num_classes
        self.in_channels = self.split.train_x.shape[1]
        self.image_size = self.split.train_x.shape[-1]
        self.next, self.state_dict = self.stream.next, self.stream.state_dict
        self.next_labeled = self.stream.next_labeled
        self.load_state_dict = self.stream.load_state_dict

    def eval_batches(self, batch_size, device):
        return self.ordered_batches("test", batch_size, device, eval_share(
            len(self.split.test_y), batch_size, self.rank, self.world))

    def _images(self, split):
        return self.split.train_x if split == "train" else self.split.test_x

    def ordered_batches(self, split, batch_size, device, rows=None):
        x, y = self._images(split), self.labels(split)
        if rows is not None:
            x, y = x[rows], y[rows]
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)

    def labels(self, split):
        return self.split.train_y if split == "train" else self.split.test_y

    def fingerprint(self, split):
        return _fingerprint(self.labels(split).tolist(), self._images(split).numpy().tobytes())

    def describe(self):
        return self.split.describe()


def check_data_root(d):
    """The cheap part of the data checks (no files read), for callers that want bad settings to
    fail before any training: a folder source needs data.root, an existing folder, and
    data.image_size."""
    from pathlib import Path

    if d["name"] == "digits":
        return
    missing = [f"data.{key}" for key in ("root", "image_size") if d[key] is None]
    if missing:  # the presets on images give no root: where the data lives is the user's
        raise DataError(f"data.name={d['name']} needs {' and '.join(missing)}: " + " ".join(
            f"--set {key}={'DIR' if key == 'data.root' else 'PIXELS'}" for key in missing))
    if not Path(d["root"]).is_dir():
        raise DataError(f"data root {d['root']} does not exist or is not a folder")


def _index_trees(d, root):
    """(train index, test index) of a JPEG tree, with lines while a tree takes a while."""
    from pathlib import Path

    from mpl_fast.progress import ProgressLines

    def lines(tree):
        return ProgressLines(f"indexing {tree}:", "class folders", silent_if_quick=True)

    train_root = root / "train" if (root / "train").is_dir() else root
    test_root = Path(d["test_root"]) if d["test_root"] else root / "test"
    # before the train tree's minute of indexing; index_folder would call it a missing data root
    if not test_root.is_dir():
        given = "data.test_root" if d["test_root"] else "the test split (root/test)"
        raise DataError(f"{given} {test_root} does not exist or is not a folder: put the "
                        f"test images there, or give data.test_root=DIR")
    index = index_folder(train_root, lines(train_root))
    test_index = index_folder(test_root, lines(test_root))
    if test_index.classes != index.classes:
        raise DataError(f"the class folders of {test_root} differ from those of {train_root}")
    return index, test_index


def from_rank_0(make, world):
    """make() on rank 0 alone and its result handed to every process of the run (one
    broadcast); a DataError it raises is raised on every process, which would otherwise wait
    for rank 0 forever. One process: make()."""
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized():
        return make()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("made", make())
        except DataError as err:
            box[0] = ("failed", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "failed":
        raise DataError(value)
    return value


class FolderData:
    """Through DALI: a JPEG tree (root/train and root/test, or data.root and data.test_root),
    or CIFAR python batches (data.name=cifar_batches, data.root the batches folder)."""

    def __init__(self, d, seed, device, rank=0, world=1):
        from pathlib import Path

        check_data_root(d)
        root = Path(d["root"])
        if d["name"] == "cifar_batches":
            from mpl_fast.data import cifar_batches

            self.index, self.test_index = cifar_batches.load(root)
        else:  # under torchrun rank 0 alone walks the trees (1.28M files for ImageNet)
            self.index, self.test_index = from_rank_0(lambda: _index_trees(d, root), world)
        if d["split_list"] and d["name"] == "cifar_batches":
            raise DataError("data.split_list names files; CIFAR python batches have none")
        if d["split_list"]:
            self.labeled = split_from_list(self.index, d["split_list"])
        elif d["labeled_percent"] is not None:
            self.labeled = balanced_split(self.index, percent=d["labeled_percent"],
                                          seed=d["split_seed"])
        else:
            self.labeled = balanced_split(self.index, per_class=d["labeled_per_class"],
                                          seed=d["split_seed"])
        self.d, self.seed, self.device, self.rank, self.world = d, seed, device, rank, world
        self.num_classes, self.in_channels = len(self.index.classes), 3
        self.image_size = d["image_size"]
        self.small = self.image_size <= 64
        # small images already at the size (CIFAR at 32) are not resized, in training or eval
        self.sized = self.small and all_of_size(self.index, self.image_size)
        self.test_sized = self.small and all_of_size(self.test_index, self.image_size)
        if d["decode_device"] == "once":
            from mpl_fast.data.decode_once import check_fits

            if not (self.sized and self.test_sized):
                raise DataError(f"data.decode_device=once needs small images (64 px at most) "
                                f"all {self.image_size}x{self.image_size}, in training and test "
                                "sets")
            check_fits(len(self.index) + len(self.test_index), self.image_size)
        self._decoded = {}  # decode_device=once: 'train' / 'test' -> the decoded ArrayIndex
        self.batches = 0
        self.stream = None
        self._eval = {}  # (batch size, device) -> EvalStream

    def _build(self):
        from mpl_fast.data.dali_stream import DaliStream, StreamSpec

        d = self.d
        spec = StreamSpec(d["batch_size"], d["mu"], self.image_size, self.small,
                          d["randaugment_n"], d["randaugment_m"], d["cutout"],
                          d["num_threads"], self.seed, self.sized, d["decode_device"],
                          d["augment_device"], d["steps_per_run"], d["hw_decoder_load"],
                          d["unlabeled_pipelines"])
        self.stream = DaliStream(self._stream_index("train"), self.labeled, spec, self.device,
                                 self.rank, self.world, start_step=self.batches)

    def _stream_index(self, which):
        """The index the pipelines read: with decode_device=once, the images decoded once for
        the whole run (kept across the stream's rebuilds on resume)."""
        index = self._index(which)
        if self.d["decode_device"] != "once":
            return index
        if which not in self._decoded:
            from mpl_fast.data.decode_once import decode_index

            self._decoded[which] = decode_index(index, self.image_size, self.d["num_threads"],
                                                quiet=self.rank != 0)
        return self._decoded[which]

    def next(self):
        if self.stream is None:
            self._build()
        self.batches += 1
        return self.stream.next()

    def next_labeled(self):
        if self.stream is None:
            self._build()
        self.batches += 1  # the position a resume derives its seeds from, whichever batches
        return self.stream.next_labeled()

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]
        self.stream = None  # rebuilt with seeds derived from the step (see dali_stream)

    def eval_batches(self, batch_size, device):
        """One pass over this replica's share of the test set, from a pipeline kept for the
        run's later evaluations (with decode_device=once, that share decoded once)."""
        from mpl_fast.data.dali_stream import EvalStream
        from mpl_fast.data.decode_once import decode_index

        key = (batch_size, str(device))
        if key not in self._eval:
            rows = eval_share(len(self.test_index), batch_size, self.rank, self.world)
            if not rows:  # more replicas than test batches
                return iter(())
            index = _rows_of(self.test_index, rows)
            if self.d["decode_device"] == "once":
                index = decode_index(index, self.image_size, self.d["num_threads"],
                                     quiet=self.rank != 0)
            self._eval[key] = EvalStream(
                index, self.image_size, self.small, device, batch_size, self.d["num_threads"],
                self.test_sized, self.d["decode_device"], self.d["augment_device"],
                self.d["hw_decoder_load"])
        return self._eval[key].batches()

    def ordered_batches(self, split, batch_size, device, rows=None):
        """Every image of `split` once (or its `rows`), in index order, as evaluation sees it (a
        pipeline of its own: one pass)."""
        from mpl_fast.data.dali_stream import eval_batches

        index = self._stream_index(split)
        if rows is not None:
            if not rows:
                return iter(())
            index = _rows_of(index, rows)
        return eval_batches(index, self.image_size, self.small, device, batch_size,
                            self.d["num_threads"], self.sized if split == "train" else
                            self.test_sized, self.d["decode_device"], self.d["augment_device"],
                            self.d["hw_decoder_load"])

    def _index(self, split):
        return self.index if split == "train" else self.test_index

    def labels(self, split):
        import torch

        return torch.as_tensor(self._index(split).labels, dtype=torch.int64)

    def fingerprint(self, split):
        index = self._index(split)
        if hasattr(index, "files"):  # names below the root: the data may move
            root = os.path.join(str(index.root), "")
            return _fingerprint(index.labels, "\n".join(  # a million names: no relpath each
                f[len(root):] if f.startswith(root) else os.path.relpath(f, index.root)
                for f in index.files).encode())
        return _fingerprint(index.labels, index.images.tobytes())

    def describe(self):
        return {"root": self.index.root, "classes": self.index.classes,
                "train": len(self.index), "labeled": len(self.labeled),
                "unlabeled": len(self.index), "test": len(self.test_index),
                "labeled_indices": self.labeled,
                **({"labeled_files": [self.index.files[i] for i in self.labeled]}
                   if hasattr(self.index, "files") else {}),
                "skipped": self.index.skipped + self.test_index.skipped}


def _fingerprint(labels, content: bytes) -> str:
    h = hashlib.sha256(content)
    h.update(",".join(map(str, labels)).encode())
    return h.hexdigest()[:16]


def build_data(d, seed, device, rank=0, world=1):
    if d["name"] == "digits":
        return DigitsData(d, seed, rank, world)
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        raise DataError("data.name=image_folder needs NVIDIA DALI: pip install "
                        "'mpl-fast[dali]' (nvidia-dali-cuda130)") from err
    return FolderData(d, seed, device, rank, world)
