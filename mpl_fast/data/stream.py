"""Step-based batches from in-memory tensors: labeled batch B and unlabeled batch mu*B (weak and
strong views of the same images) in lockstep, epochs of seeded permutations, and a state dict
that holds the exact data position for resume. Under DDP every rank draws the same global
batch and keeps its own slice, so N ranks see exactly what one process would."""
import torch

from mpl_fast.data import augment
from mpl_fast.data.splits import DataError
from mpl_fast.mpl.step import MPLBatch


class _Epochs:
    def __init__(self, size: int, gen: torch.Generator):
        self.size, self.gen = size, gen
        self.perm, self.pos = torch.randperm(size, generator=gen), 0

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos == self.size:
                self.perm, self.pos = torch.randperm(self.size, generator=self.gen), 0
            k = min(n, self.size - self.pos)
            out.append(self.perm[self.pos:self.pos + k])
            self.pos += k
            n -= k
        return torch.cat(out)


class InMemoryStream:
    def __init__(self, split, batch_size: int, mu: int, seed: int, pad: int = 1,
                 hflip: bool = False, cutout: int = 3, strength: float = 0.5,
                 rank: int = 0, world: int = 1):
        if batch_size % world:
            raise DataError(f"data.batch_size={batch_size} must divide by the world size {world}")
        self.split, self.batch_size, self.mu = split, batch_size, mu
        self.aug = dict(pad=pad, hflip=hflip)
        self.strong_aug = dict(strength=strength, cutout_size=cutout)
        self.rank, self.world = rank, world
        self.gen = torch.Generator().manual_seed(seed)
        self.labeled = _Epochs(len(split.labeled), self.gen)
        self.unlabeled = _Epochs(len(split.train_x), self.gen)
        self.batches = 0

    def _mine(self, t):
        return t[self.rank::self.world] if self.world > 1 else t

    def next(self) -> MPLBatch:
        s = self.split
        li = s.labeled[self.labeled.take(self.batch_size)]
        ui = self.unlabeled.take(self.batch_size * self.mu)
        x_l = augment.weak(s.train_x[li], self.gen, **self.aug)
        x_u = s.train_x[ui]
        x_uw = augment.weak(x_u, self.gen, **self.aug)
        x_us = augment.strong(x_u, self.gen, **self.aug, **self.strong_aug)
        self.batches += 1
        batch = MPLBatch(self._mine(x_l), self._mine(s.train_y[li]), self._mine(x_uw),
                         self._mine(x_us))
        # rows of train_x (e.g. rows of a Reduced-MPL logit store)
        batch.labeled_index, batch.unlabeled_index = self._mine(li), self._mine(ui)
        batch.y_u = self._mine(s.train_y[ui])  # for the pseudo/accuracy diagnostic alone
        return batch

    def next_labeled(self) -> MPLBatch:
        """A labeled batch alone (finetuning), without drawing unlabeled views."""
        s = self.split
        li = s.labeled[self.labeled.take(self.batch_size)]
        x_l = augment.weak(s.train_x[li], self.gen, **self.aug)
        self.batches += 1
        empty = x_l[:0]
        batch = MPLBatch(self._mine(x_l), self._mine(s.train_y[li]), empty, empty)
        batch.labeled_index = self._mine(li)
        return batch

    def state_dict(self):
        return {"gen": self.gen.get_state(), "batches": self.batches,
                "labeled": (self.labeled.perm, self.labeled.pos),
                "unlabeled": (self.unlabeled.perm, self.unlabeled.pos)}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.batches = state["batches"]
        self.labeled.perm, self.labeled.pos = state["labeled"]
        self.unlabeled.perm, self.unlabeled.pos = state["unlabeled"]
