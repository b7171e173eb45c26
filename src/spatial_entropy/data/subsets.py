"""Stratified, seed-deterministic subsets of classification datasets (data-efficiency studies).

Rule: for each class c (in label order) the item indices of c are shuffled by one
``numpy.random.default_rng(seed)`` permutation and the first ``k_c`` are kept, where
``k_c = n_per_class`` or ``k_c = max(1, round(fraction * count_c))``; the kept indices are
returned in dataset order. With the same seed a smaller subset is contained in a larger one
(the permutations are the same, only the prefix is longer), so learning curves over
n in {50, 100, 300, 1000} compare nested training sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset


def stratified_indices(
    targets: Sequence[int],
    *,
    n_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of a stratified subset of items with labels ``targets`` (length N).

    Exactly one of ``n_per_class`` (items kept per class) and ``fraction`` (in (0, 1]) is given.
    Raises ValueError if a class has fewer than ``n_per_class`` items.
    """
    if (n_per_class is None) == (fraction is None):
        raise ValueError(
            f"give exactly one of n_per_class and fraction; got n_per_class={n_per_class}, "
            f"fraction={fraction}"
        )
    if n_per_class is not None and n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1; got {n_per_class}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    labels = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = members[rng.permutation(len(members))]
        if n_per_class is not None:
            if n_per_class > len(members):
                raise ValueError(
                    f"class {label} has {len(members)} items; cannot take n_per_class={n_per_class}"
                )
            count = n_per_class
        else:
            count = max(1, round(fraction * len(members)))
        kept.append(order[:count])
    return sorted(np.concatenate(kept).tolist()) if kept else []


class ClassSubset(Subset):
    """A subset that keeps the dataset attributes the engine reads (``num_classes``,
    ``in_chans``, ``classes``, ``mean``, ``std``) and has its own ``targets``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.targets = [dataset.targets[i] for i in self.indices]

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes the subset lacks: read them from the full dataset
        if name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def stratified_subset(
    dataset: Dataset,
    *,
    n_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> ClassSubset:
    """A `ClassSubset` of ``dataset`` (which needs a ``targets`` list) chosen by
    `stratified_indices`."""
    if not hasattr(dataset, "targets"):
        raise TypeError(f"expected a dataset with a `targets` list; got {type(dataset).__name__}")
    indices = stratified_indices(
        dataset.targets, n_per_class=n_per_class, fraction=fraction, seed=seed
    )
    return ClassSubset(dataset, indices)
