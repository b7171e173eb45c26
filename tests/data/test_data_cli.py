"""`spatial-entropy data info`, called in-process."""

import pytest
from PIL import Image

from spatial_entropy.cli import main
from spatial_entropy.data import fashion_mnist


@pytest.fixture(autouse=True)
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    monkeypatch.setenv("SPATIAL_ENTROPY_CACHE", str(tmp_path / "cache"))


def test_info_prints_size_and_classes(fashion_dir, capsys):
    argv = ["data", "info", "fashion-mnist", "--data-path", str(fashion_dir), "--split", "test"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "250 images, 10 classes"
    assert "images per class: min 25, max 25" in out


def test_info_with_options_subset_and_grid(fashion_dir, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    argv = [
        "data", "info", "cluttered-fashion", "--data-path", str(fashion_dir),
        "--set", "train_per_class=3", "--set", "distractors=2", "--set", "in_chans=3",
        "--n-per-class", "2", "--grid", str(grid), "--grid-count", "5", "--masks",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("20 images, 10 classes\n") and "in_chans 3" in out
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 100


def test_bad_input_exits_1_with_the_error(tmp_path, capsys):
    assert main(["data", "info", "cifar10", "--data-path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "batches.meta: not found" in err and "Traceback" not in err
    assert main(["data", "info", "fashion-mnist", "--set", "nonsense"]) == 1
    assert "key=value" in capsys.readouterr().err
    assert main(["data", "info", "fashion-mnist", "--set", "colour=1"]) == 1
    assert "unknown option(s) ['colour']" in capsys.readouterr().err
    assert main(["data", "info", "pets", "--data-path", str(tmp_path), "--split", "val"]) == 1
    assert "test.txt: not found" in capsys.readouterr().err
