"""Stratified, seed-deterministic subsets."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spatial_entropy.data import ClassSubset, stratified_indices, stratified_subset

TARGETS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]


def test_n_per_class_takes_exactly_n_of_each_class():
    kept = stratified_indices(TARGETS, n_per_class=2, seed=0)
    assert kept == sorted(kept) and len(set(kept)) == 6
    assert sorted(TARGETS[i] for i in kept) == [0, 0, 1, 1, 2, 2]


def test_fraction_rounds_per_class_and_keeps_one():
    # class sizes 3, 3, 4: round(0.5 * n) = 2, 2, 2; 0.01 keeps at least one per class
    assert len(stratified_indices(TARGETS, fraction=0.5)) == 6
    assert sorted(TARGETS[i] for i in stratified_indices(TARGETS, fraction=0.01)) == [0, 1, 2]
    assert stratified_indices(TARGETS, fraction=1.0) == list(range(len(TARGETS)))


def test_same_seed_same_subset_and_nested():
    targets = np.repeat(np.arange(5), 40).tolist()
    assert stratified_indices(targets, n_per_class=10, seed=3) == stratified_indices(
        targets, n_per_class=10, seed=3
    )
    assert stratified_indices(targets, n_per_class=10, seed=3) != stratified_indices(
        targets, n_per_class=10, seed=4
    )
    small = set(stratified_indices(targets, n_per_class=5, seed=7))
    assert small < set(stratified_indices(targets, n_per_class=20, seed=7))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=80),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_property_counts_per_class(targets, n, seed):
    counts = np.bincount(targets)
    if n > counts[counts > 0].min():
        with pytest.raises(ValueError, match="cannot take n_per_class"):
            stratified_indices(targets, n_per_class=n, seed=seed)
        return
    kept = stratified_indices(targets, n_per_class=n, seed=seed)
    kept_counts = np.bincount([targets[i] for i in kept], minlength=len(counts))
    np.testing.assert_array_equal(kept_counts, np.where(counts > 0, n, 0))
    assert len(set(kept)) == len(kept) and all(0 <= i < len(targets) for i in kept)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of n_per_class and fraction"):
        stratified_indices(TARGETS)
    with pytest.raises(ValueError, match="exactly one"):
        stratified_indices(TARGETS, n_per_class=1, fraction=0.5)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        stratified_indices(TARGETS, fraction=1.5)
    with pytest.raises(ValueError, match="class 0 has 3 items"):
        stratified_indices(TARGETS, n_per_class=4)
    with pytest.raises(TypeError, match="`targets` list"):
        stratified_subset([1, 2, 3], n_per_class=1)


class Tiny:
    """Minimal dataset with the attributes the engine reads."""

    num_classes, in_chans, classes, mean, std = 3, 1, ["a", "b", "c"], (0.5,), (0.2,)

    def __init__(self):
        self.targets = TARGETS

    def __getitem__(self, index):
        return index * 10, self.targets[index]

    def __len__(self):
        return len(self.targets)


def test_subset_keeps_attributes_and_items():
    subset = stratified_subset(Tiny(), n_per_class=1, seed=0)
    assert isinstance(subset, ClassSubset) and len(subset) == 3
    assert (subset.num_classes, subset.in_chans, subset.classes) == (3, 1, ["a", "b", "c"])
    assert subset.mean == (0.5,) and subset.std == (0.2,)
    for position, index in enumerate(subset.indices):
        assert subset[position] == (index * 10, TARGETS[index])
        assert subset.targets[position] == TARGETS[index]
