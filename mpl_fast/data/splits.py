"""Choosing the labeled subset: seeded and class-balanced, shared by every data source."""
from typing import Optional, Sequence

import torch


class DataError(ValueError):
    """Bad input data: a one-line message."""


def balanced_indices(labels: torch.Tensor, per_class: Optional[int] = None,
                     percent: Optional[float] = None, seed: int = 0,
                     class_names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """`per_class` indices of each class (or `percent` of each class, rounded, at least 1),
    each class's chosen by a seeded permutation of its members; concatenated class by class."""
    if (per_class is None) == (percent is None):
        raise DataError("give exactly one of labeled_per_class and labeled_percent")
    num_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        k = per_class if per_class is not None else max(1, round(len(members) * percent / 100))
        if k > len(members):
            name = class_names[c] if class_names is not None else c
            raise DataError(f"labeled_per_class={k} but class {name} has only "
                            f"{len(members)} images")
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen)
