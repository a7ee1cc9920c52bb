"""scikit-learn's digits (8x8, 10 classes) as the embedded data set: a seeded, class-balanced
labeled subset, the whole training split as the unlabeled set, and a held-out test split."""
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits


@dataclass
class InMemorySplit:
    train_x: torch.Tensor  # N x 1 x 8 x 8 float32, normalised
    train_y: torch.Tensor
    labeled: torch.Tensor  # indices into train_x
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def describe(self):
        return {"train": len(self.train_x), "labeled": len(self.labeled),
                "unlabeled": len(self.train_x), "test": len(self.test_x),
                "labeled_indices": self.labeled.tolist()}


def balanced_labeled(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """per_class indices of each class, chosen by a seeded permutation; sorted."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        if len(members) < per_class:
            raise ValueError(f"data.labeled_per_class={per_class} but class {c} has only "
                             f"{len(members)} training images")
        picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def digits(labeled_per_class: int = 10, test_fraction: float = 0.3, seed: int = 0
           ) -> InMemorySplit:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    rng = np.random.RandomState(seed)
    test = []
    for c in range(10):  # stratified test split
        members = np.nonzero(data.target == c)[0]
        rng.shuffle(members)
        test.extend(members[:int(round(test_fraction * len(members)))].tolist())
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[test] = True
    train_x, train_y = x[~test_mask], y[~test_mask]
    mean, std = train_x.mean(), train_x.std()
    norm = lambda t: (t - mean) / std  # noqa: E731
    return InMemorySplit(norm(train_x), train_y, balanced_labeled(train_y, labeled_per_class, seed),
                         norm(x[test_mask]), y[test_mask], 10)
