"""Fashion-MNIST: IDX parsing, file lookup, bad input, dataset items."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from data_writers import fashion_arrays, write_idx

from spatial_entropy.cli import main
from spatial_entropy.data import (
    DatasetError,
    DatasetNotFoundError,
    build_dataset,
    fashion_mnist,
    find_fashion_mnist,
    read_idx,
)


@pytest.fixture(autouse=True)
def no_system_copy(monkeypatch, tmp_path):
    # tests must not depend on (or find) the machine's copy or cache
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", ())
    monkeypatch.setenv("SPATIAL_ENTROPY_CACHE", str(tmp_path / "cache"))


def test_read_idx_hand_made_bytes(tmp_path):
    # type 0x08 (uint8), 2 dims: 2 x 3, then 6 bytes
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    expected = np.array([[1, 2, 3], [4, 5, 6]], np.uint8)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), expected)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), expected)


def test_read_idx_truncated_and_bad_magic(tmp_path):
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5])
    (tmp_path / "short").write_bytes(raw)
    with pytest.raises(DatasetError, match="short.*promises 6"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x1f\x8b" + raw)
    with pytest.raises(DatasetError, match="magic.*IDX"):
        read_idx(tmp_path / "magic")


@pytest.mark.parametrize("gz", [True, False])
def test_dataset_items_match_files(tmp_path, write_fashion, gz):
    folder = write_fashion(tmp_path / "f", gz=gz)
    images, labels = fashion_arrays("test", seed=4)
    dataset = build_dataset("fashion-mnist", "test", data_path=folder)
    assert (len(dataset), dataset.num_classes, dataset.in_chans) == (250, 10, 1)
    assert dataset.targets == labels.tolist()
    image, label = dataset[7]
    assert image.shape == (1, 28, 28) and label == labels[7]
    expected = (torch.from_numpy(images[7]).float() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(image[0], expected)
    assert build_dataset("fashion-mnist", "val", data_path=folder).targets == labels.tolist()


def test_in_chans_three_replicates_grey(fashion_dir):
    dataset = build_dataset("fashion-mnist", "test", data_path=fashion_dir, options={"in_chans": 3})
    image, _ = dataset[0]
    assert image.shape == (3, 28, 28) and dataset.in_chans == 3 and len(dataset.mean) == 3
    torch.testing.assert_close(image[0], image[2])


def test_lookup_order_data_path_then_system(tmp_path, monkeypatch, write_fashion):
    system = write_fashion(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", (system,))
    assert find_fashion_mnist(None, download=False) == system
    assert find_fashion_mnist(tmp_path / "empty", download=False) == system
    own = write_fashion(tmp_path / "own" / "FashionMNIST" / "raw", gz=False)
    assert find_fashion_mnist(tmp_path / "own", download=False) == own


def test_missing_everywhere_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_dataset("fashion-mnist", "train", data_path=tmp_path, options={"download": False})


def test_readme_demo_offline_without_the_package_is_one_line(tmp_path, monkeypatch, capsys):
    # The README's first command on a machine with neither the Debian package nor a network.
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    code = main(["train", "--config", str(demo), "--output", str(tmp_path / "demo")])
    error = capsys.readouterr().err
    assert code == 1 and len(error.strip().splitlines()) == 1, error
    # what to do comes first, the download's failure after it
    assert error.startswith("spatial-entropy train: Fashion-MNIST not found; install")
    assert error.index("apt-get install dataset-fashion-mnist") < error.index("no network")


def test_partial_folder_names_missing_file(fashion_dir):
    (fashion_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        find_fashion_mnist(fashion_dir, download=False)


def test_label_out_of_range_raises_or_is_skipped(fashion_dir):
    images, labels = fashion_arrays("train", seed=5)
    labels[[3, 9]] = 10
    write_idx(fashion_dir / "train-labels-idx1-ubyte.gz", labels)
    message = r"train-labels-idx1-ubyte.gz: label 10 of item 3 is out of range; expected 0\.\.9"
    with pytest.raises(DatasetError, match=message):
        build_dataset("fashion-mnist", "train", data_path=fashion_dir)
    with pytest.warns(UserWarning, match="skipped 2"):
        dataset = build_dataset("fashion-mnist", "train", data_path=fashion_dir, skip_bad=True)
    assert dataset.skipped == 2 and len(dataset) == len(labels) - 2
    assert dataset.targets == np.delete(labels, [3, 9]).tolist()


def test_label_count_mismatch_names_both_files(fashion_dir):
    write_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError, match="t10k-labels.*expected \\(250,\\)"):
        build_dataset("fashion-mnist", "test", data_path=fashion_dir)


REAL = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_files_from_the_debian_package():
    test = build_dataset("fashion-mnist", "test", data_path=REAL)
    assert len(test) == 10_000 and np.bincount(test.targets).tolist() == [1000] * 10
    image, _ = test[0]
    assert image.shape == (1, 28, 28)
