"""The paper's TwoMoons illustration data: 2000 points, 3 labeled per class."""
from dataclasses import dataclass

import torch
from sklearn.datasets import make_moons

from mpl_fast.data.splits import balanced_indices


@dataclass
class TwoMoons:
    x: torch.Tensor  # N x 2 float32, all points (the unlabeled set)
    y: torch.Tensor  # N int64, true classes (for evaluation only)
    labeled: torch.Tensor  # indices of the labeled points


def two_moons(seed: int, n: int = 2000, noise: float = 0.1, labeled_per_class: int = 3
              ) -> TwoMoons:
    x, y = make_moons(n, noise=noise, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return TwoMoons(x, y, balanced_indices(y, per_class=labeled_per_class, seed=seed))
