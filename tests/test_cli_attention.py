"""`spatial-entropy attention`, `plot` and `evaluate --attention` on tiny run directories."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from spatial_entropy.checkpoint import save_weights
from spatial_entropy.cli import main
from spatial_entropy.config import load_config, save_config
from spatial_entropy.models import create_model
from spatial_entropy.visualize import PANEL_INCHES

TEST_SIZE = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two untrained runs on a small cluttered-fashion test set: baseline and regularised."""
    root = tmp_path_factory.mktemp("runs")
    cache = root / "cache"
    made = {}
    for name, weight, no_last_skip in (("baseline", 0.0, False), ("se", 0.01, True)):
        run_dir = root / name
        run_dir.mkdir()
        config = load_config(
            values={
                "model": "se_vit_small_patch8_64",
                "model_kwargs": {"depth": 2, "embed_dim": 32},
                "dataset": "cluttered-fashion",
                "data_options": {"test_size": TEST_SIZE, "cache_dir": str(cache)},
                "no_last_skip": no_last_skip,
                "batch_size": 4,
                "num_workers": 0,
                "se": {"weight": weight},
            }
        )
        save_config(config, run_dir / "config.yaml")
        torch.manual_seed(len(made))
        model = create_model(
            config.model,
            num_classes=10,
            in_chans=1,
            no_last_skip=no_last_skip,
            **config.model_kwargs,
        )
        save_weights(model, run_dir / "model.safetensors")
        made[name] = run_dir
    return made


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_attention_picture_of_a_split(runs, tmp_path):
    out = tmp_path / "one.png"
    assert main(["attention", str(runs["baseline"]), "--count", "3", "--out", str(out)]) == 0
    # input + 4 heads + mask + object mask = 7 panels wide, 3 rows; 100 dpi.
    width, height = png_size(out)
    assert width == round(7 * PANEL_INCHES * 100)
    assert height == round((3 * PANEL_INCHES + 0.4) * 100)


def test_attention_compare_puts_runs_side_by_side(runs, tmp_path):
    out = tmp_path / "compare.png"
    argv = ["attention", str(runs["baseline"]), "--compare", str(runs["se"]), "--count", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert png_size(out)[0] == round((1 + 5 + 5 + 1) * PANEL_INCHES * 100)


def test_attention_on_a_folder_of_images(runs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder.png"
    assert main(["attention", str(runs["se"]), "--images", str(folder), "--out", str(out)]) == 0
    # No object masks: input + 4 heads + mask, 2 rows.
    assert png_size(out) == (
        round(6 * PANEL_INCHES * 100),
        round((2 * PANEL_INCHES + 0.4) * 100),
    )


def test_attention_on_a_folder_keeps_to_count(runs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "two.png"
    argv = ["attention", str(runs["se"]), "--images", str(folder), "--count", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert png_size(out)[1] == round((2 * PANEL_INCHES + 0.4) * 100)  # two rows, not four


def test_attention_reports_a_missing_run(tmp_path, capsys):
    assert main(["attention", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert re.fullmatch(r"spatial-entropy attention: .*config.yaml.*\n", capsys.readouterr().err)


def test_evaluate_with_attention_writes_the_statistics(runs, capsys):
    run_dir = runs["baseline"]
    assert main(["evaluate", str(run_dir), "--device", "cpu", "--attention"]) == 0
    saved = json.loads((run_dir / "eval.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    for key in ("top1", "jaccard", "se_mean", "regions_mean", "single_region_share"):
        assert key in saved and key in printed
    assert 0.0 <= saved["jaccard"] <= 1.0
    assert 0.0 <= saved["single_region_share"] <= 1.0
    assert saved["regions_mean"] >= 1.0 - saved["single_region_share"]
    assert len(saved["se_per_head"]) == 4 and saved["jaccard_images"] == TEST_SIZE


def write_log(run_dir, rows):
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    (run_dir / "log.csv").write_text("\n".join(lines) + "\n")


def test_plot_training_curves(runs, tmp_path, capsys):
    row = {"epoch": 0, "step": 5, "train_loss": 2.3, "lr": 1e-4, "val_top1": 10.0,
           "val_top5": 50.0, "val_loss": 2.3}  # fmt: skip
    write_log(runs["baseline"], [row, row | {"epoch": 1, "val_top1": ""}])
    se_row = row | {"train_se": 0.8, "se_weight": 0.005}
    write_log(runs["se"], [se_row, se_row | {"epoch": 1, "train_se": 0.6}])

    assert main(["plot", str(runs["baseline"])]) == 0
    assert (runs["baseline"] / "training.png").is_file()
    assert "train_se" in capsys.readouterr().err

    out = tmp_path / "both.png"
    assert main(["plot", str(runs["baseline"]), str(runs["se"]), "--out", str(out)]) == 0
    assert out.is_file() and "train_se" not in capsys.readouterr().err

    assert main(["plot", str(runs["baseline"]), str(runs["se"])]) == 1
    assert "--out" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 1
    assert "log.csv: not found" in capsys.readouterr().err
