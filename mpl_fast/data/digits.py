"""scikit-learn's digits (8x8, 10 classes) as the embedded data set: a seeded, class-balanced
labeled subset, the whole training split as the unlabeled set, and a held-out test split."""
from dataclasses import dataclass

import numpy as np
import torch

from mpl_fast.data.splits import balanced_indices


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


def digits(labeled_per_class: int = 10, test_fraction: float = 0.3, seed: int = 0
           ) -> InMemorySplit:
    # imported here: scikit-learn (with scipy) takes seconds to import, and only this data set
    # needs it, not every run that imports the data sources
    from sklearn.datasets import load_digits

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
    labeled = balanced_indices(train_y, per_class=labeled_per_class, seed=seed).sort().values
    return InMemorySplit(norm(train_x), train_y, labeled,
                         norm(x[test_mask]), y[test_mask], 10)
