"""benchmarks/attention_mass.py: attention shares on object / distractors / rest, by hand."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def am(load_benchmark):
    return load_benchmark("attention_mass")


def test_shares_by_hand(am) -> None:
    # 2x2 grid over a 4x4 image; patches in raster order TL, TR, BL, BR
    attention = torch.tensor([[[0.5, 0.25, 0.25, 0.0]]])
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # the whole TL patch ...
    masks[0, 0, 2] = True  # ... and one of TR's four pixels
    distractors = torch.zeros(1, 4, 4, dtype=torch.bool)
    distractors[0, 2:, :2] = True  # the whole BL patch
    distractors[0, 0, 2] = True  # overlaps the object: counted as object only
    shares = am.mass_shares(attention, (2, 2), masks, distractors)
    assert shares[0].tolist() == pytest.approx([0.5 + 0.25 / 4, 0.25, 1 - 0.5625 - 0.25])
    # unnormalised attention (e.g. softmax over all keys, [CLS] entry dropped) gives the same
    assert torch.allclose(am.mass_shares(attention * 0.7, (2, 2), masks, distractors), shares)


def test_shares_average_heads_and_sum_to_one(am) -> None:
    attention = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 1.0]]])  # head 0 on TL, head 1 on BR
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    none = torch.zeros(1, 4, 4, dtype=torch.bool)
    shares = am.mass_shares(attention, (2, 2), masks, none)
    assert shares[0].tolist() == pytest.approx([0.5, 0.0, 0.5])
    random = torch.rand(3, 4, 16)
    masks = torch.rand(3, 8, 8) > 0.5
    distractors = torch.rand(3, 8, 8) > 0.5
    assert torch.allclose(am.mass_shares(random, (4, 4), masks, distractors).sum(-1),
                          torch.ones(3, dtype=torch.float64))  # fmt: skip


def test_shares_reject_a_grid_that_does_not_tile_the_image(am) -> None:
    with pytest.raises(ValueError, match="whole number"):
        am.mass_shares(torch.ones(1, 1, 9), (3, 3), torch.zeros(1, 4, 4, dtype=torch.bool),
                       torch.zeros(1, 4, 4, dtype=torch.bool))  # fmt: skip


def test_distractor_windows_scale_boxes(am) -> None:
    # box x in [1, 3), y in [0, 2) on a 4-px canvas, drawn at 8 px: columns 2-5, rows 0-3
    boxes = torch.tensor([[[1, 0, 3, 2]]])
    window = am.distractor_windows(boxes, canvas=4, size=8)[0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:4, 2:6] = True
    assert torch.equal(window, expected)
    # no distractors at all: an empty union
    assert not am.distractor_windows(torch.zeros(2, 0, 4), canvas=4, size=8).any()


def test_head_statistics_by_hand(am) -> None:
    # 3x3 grid, raster order; the foreground is the patches above the map's mean
    logits = torch.zeros(2, 2, 9)
    logits[0, 0, [0, 1]] = 1.0  # one blob of two patches
    logits[0, 1, [0, 8]] = 1.0  # two opposite corners: two regions
    # image 1, head 0: constant, no foreground, no region
    logits[1, 1] = 1.0
    logits[1, 1, 4] = 0.0  # all but the centre: 8 patches around it, one ring
    # spread: the top five patches are the first to hold 60 % (0.15 + ... + 0.11 = 0.65)
    spread = torch.tensor([0.15, 0.14, 0.13, 0.12, 0.11, 0.10, 0.09, 0.08, 0.08])
    attention = spread.expand(2, 2, 9).clone()
    attention[0, 0] = torch.tensor([0.7, 0.3, 0, 0, 0, 0, 0, 0, 0])  # one patch holds 60 %
    sums = am.head_statistics(logits, attention, (3, 3))
    assert sums[0].tolist() == pytest.approx([2 / 9, 2 / 9 + 8 / 9])
    assert sums[1].tolist() == [1.0, 3.0]
    assert sums[2].tolist() == pytest.approx([1 / 9 + 5 / 9, 5 / 9 + 5 / 9])


def test_table_reports_the_most_diffuse_head(am) -> None:
    run = {"n_per_class": 50, "arm": "se", "object": 0.2, "distractors": 0.1, "rest": 0.7,
           "object_area": 0.13, "distractor_area": 0.09, "foreground_per_head": [0.4, 0.6],
           "mass_area_per_head": [0.1, 0.5], "regions_per_head": [3.0, 1.2]}  # fmt: skip
    row = am.table([run]).splitlines()[-1]
    assert row.endswith("| 0.500 | 0.300 | 0.500 (1.20) |")
    old = {k: v for k, v in run.items() if not k.endswith("_per_head")}  # an older record
    assert am.table([old]).splitlines()[-1].endswith("| 0.090 |  |  |  |")
