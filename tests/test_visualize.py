"""Attention grids and training curves: panels, sizes, labels, and clear errors."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from spatial_entropy.visualize import (
    PANEL_INCHES,
    attention_figure,
    denormalize,
    read_training_log,
    save_figure,
    training_figure,
)


def one_hot_attention(batch: int, heads: int, patch: int = 0) -> torch.Tensor:
    attention = torch.full((batch, heads, 16), 0.01)
    attention[..., patch] = 1.0
    return attention


def test_denormalize():
    images = torch.tensor([[[[0.0, 1.0]]]])
    assert denormalize(images, [0.5], [0.25]).tolist() == [[[[0.5, 0.75]]]]
    assert denormalize(torch.full((1, 1, 1, 1), 9.0), [0.5], [0.5]).item() == 1.0  # clipped
    with pytest.raises(ValueError, match="C = len"):
        denormalize(torch.zeros(1, 3, 2, 2), [0.5], [0.5])


def test_attention_grid_panels_and_size(tmp_path):
    images = torch.rand(2, 1, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True  # exactly patch 0 of the 4x4 grid
    runs = {"a": (one_hot_attention(2, 3), (4, 4)), "b": (one_hot_attention(2, 2, 15), (4, 4))}
    fig = attention_figure(images, runs, masks, row_labels=["x", "y"])
    columns = 1 + (3 + 1) + (2 + 1) + 1
    assert len(fig.axes) == 2 * columns
    titles = [ax.get_title() for ax in fig.axes[:columns]]
    assert titles[0] == "input" and titles[-1] == "object mask"
    assert titles[1] == "a\nhead 0" and titles[4] == "a\n60% mask" and titles[5] == "b\nhead 0"
    # Run a attends exactly the object (J 1), run b the opposite corner (J 0).
    assert fig.axes[1].get_xlabel() == "J 1.00" and fig.axes[5].get_xlabel() == "J 0.00"
    assert fig.axes[4].get_xlabel() == "head 0: J 1.00"
    assert fig.axes[0].get_ylabel() == "x"
    path = tmp_path / "grid.png"
    save_figure(fig, path)
    with Image.open(path) as picture:
        assert picture.size == (round(columns * PANEL_INCHES * 100), round(2.0 * 140 + 40))


def test_attention_grid_without_masks_and_with_class_maps():
    images = torch.rand(1, 3, 16, 16)
    fig = attention_figure(images, {"run": (one_hot_attention(1, 2), (4, 4))})
    assert len(fig.axes) == 1 + 2 + 1
    assert fig.axes[3].get_xlabel() == "mean of heads"
    class_map = torch.zeros(1, 16, 16, dtype=torch.uint8)
    class_map[0, :4, :4] = 5
    class_map[0, 4, :] = 255
    fig = attention_figure(images, {"run": (one_hot_attention(1, 2), (4, 4))}, class_map)
    assert len(fig.axes) == 1 + 2 + 1 + 1
    assert fig.axes[1].get_xlabel() == "J 1.00"  # the void row is ignored


def test_attention_grid_errors():
    images = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="at least one run"):
        attention_figure(images, {})
    with pytest.raises(ValueError, match="1 of 2 images"):
        attention_figure(images, {"r": (one_hot_attention(1, 1), (4, 4))})
    with pytest.raises(ValueError, match="masks of shape"):
        attention_figure(
            images, {"r": (one_hot_attention(2, 1), (4, 4))}, torch.zeros(2, 8, 8, dtype=bool)
        )
    with pytest.raises(ValueError, match="1 or 3"):
        attention_figure(torch.rand(2, 2, 16, 16), {"r": (one_hot_attention(2, 1), (4, 4))})


def test_read_training_log(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("epoch,train_loss,val_top1\n0,2.5,\n1,2.0,40.5\n")
    log = read_training_log(path)
    assert log["epoch"].tolist() == [0.0, 1.0]
    assert math.isnan(log["val_top1"][0]) and log["val_top1"][1] == 40.5
    path.write_text("epoch,train_loss\n")
    with pytest.raises(ValueError, match="no rows"):
        read_training_log(path)


def test_training_figure_reports_missing_columns():
    log = {"epoch": np.arange(3.0), "train_loss": np.array([3.0, 2.0, 1.0])}
    fig, missing = training_figure({"run": log})
    assert len(fig.axes) == 4
    assert missing == ["val_loss", "train_se", "val_se_mean", "se_weight", "val_top1"]
    assert [len(ax.lines) for ax in fig.axes] == [1, 0, 0, 0]
    assert "not logged" in fig.axes[2].texts[0].get_text()
    with pytest.raises(ValueError, match="'epoch'"):
        training_figure({"run": {"train_loss": np.ones(2)}})


def test_run_names_are_the_shortest_distinguishing_suffixes(tmp_path) -> None:
    from spatial_entropy.visualize import run_names

    paths = [tmp_path / "n50" / "baseline" / "seed1", tmp_path / "n50" / "se" / "seed1"]
    assert run_names(paths + [tmp_path / "demo"]) == ["baseline/seed1", "se/seed1", "demo"]
    assert run_names([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
