"""One shape rule for every entry point that takes per-head maps over a patch grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatial_entropy.drloc import sample_position_pairs
from spatial_entropy.entropy import spatial_entropy
from spatial_entropy.evaluation import attention_masks, map_statistics

ENTRY_POINTS = {
    "spatial_entropy": lambda maps, grid: spatial_entropy(maps, grid),
    "map_statistics": lambda maps, grid: map_statistics(maps, grid),
    "attention_masks": lambda maps, grid: attention_masks(maps.softmax(-1), grid),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("grid", "message"),
    [((True, 6), "grid_shape"), ((2, 0), "grid_shape"), ((2, 3, 1), "grid_shape"),
     (7, "grid_shape"), ((2, 2), r"N = gh \* gw = 4 ")],
)  # fmt: skip
def test_every_entry_point_rejects_the_same_grids(entry, grid, message):
    with pytest.raises(ValueError, match=message):
        ENTRY_POINTS[entry](torch.randn(1, 2, 6), grid)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_accepts_numpy_integers(entry):
    maps = torch.arange(6.0).reshape(1, 1, 6)
    expected = ENTRY_POINTS[entry](maps, (2, 3))
    got = ENTRY_POINTS[entry](maps, tuple(np.array([2, 3])))
    pairs = zip(*(v if isinstance(v, tuple) else (v,) for v in (expected, got)), strict=True)
    assert all(torch.equal(want, have) for want, have in pairs)


def test_drloc_rejects_a_boolean_grid_side():
    # True == 1 passed the old check of the DRLoc sampler
    with pytest.raises(ValueError, match="grid_shape"):
        sample_position_pairs(2, (True, 4), 3)
