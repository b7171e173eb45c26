"""Fixtures writing miniature datasets in their real on-disk formats into tmp_path."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from data_writers import (
    PETS_TEST,
    PETS_TRAINVAL,
    VOC_ITEMS,
    fashion_arrays,
    write_idx,
    write_jpeg,
    write_voc_map,
)
from PIL import Image


@pytest.fixture
def write_fashion():
    def write(folder: Path, gz: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".gz" if gz else ""
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images, labels = fashion_arrays(split, seed=len(prefix))
            write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        return folder

    return write


@pytest.fixture
def fashion_dir(tmp_path, write_fashion) -> Path:
    return write_fashion(tmp_path / "fashion")


@pytest.fixture
def write_cifar():
    """CIFAR batches: pickled dicts with bytes keys, 'data' (N, 3072) uint8 in R, G, B planes."""

    def write(root: Path, hundred: bool = False, per_batch: int = 12) -> tuple[Path, dict]:
        rng = np.random.default_rng(1)
        folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
        folder.mkdir(parents=True)
        num_classes = 100 if hundred else 10
        names = [f"class{i}".encode() for i in range(num_classes)]
        label_key = b"fine_labels" if hundred else b"labels"
        meta = {b"fine_label_names": names} if hundred else {b"label_names": names}
        with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
            pickle.dump(meta, f)
        files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
        files += [] if hundred else ["test_batch"]
        written = {}
        for name in files:
            pixels = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, num_classes, per_batch).tolist()
            rows = pixels.transpose(0, 3, 1, 2).reshape(per_batch, -1)
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": rows, label_key: labels}, f)
            written[name] = (pixels, labels)
        return folder, written

    return write


@pytest.fixture
def flowers_dir(tmp_path) -> Path:
    """jpg/image_XXXXX.jpg, imagelabels.mat (labels 1..102), setid.mat (1-based ids)."""
    rng = np.random.default_rng(2)
    root = tmp_path / "flowers"
    labels = np.array([[5, 1, 102, 5, 7, 1, 3, 3, 102]])
    for image_id in range(1, labels.shape[1] + 1):
        write_jpeg(root / "jpg" / f"image_{image_id:05d}.jpg", rng)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(
        root / "setid.mat",
        {
            "trnid": np.array([[1, 2, 3]]),
            "valid": np.array([[4, 5]]),
            "tstid": np.array([[6, 7, 8, 9]]),
        },
    )
    return root


@pytest.fixture
def pets_dir(tmp_path) -> Path:
    """images/<name>.jpg, annotations/{trainval,test}.txt, annotations/trimaps/<name>.png."""
    rng = np.random.default_rng(3)
    root = tmp_path / "pets"
    (root / "annotations" / "trimaps").mkdir(parents=True)
    for line in PETS_TRAINVAL + PETS_TEST:
        name = line.split()[0]
        write_jpeg(root / "images" / f"{name}.jpg", rng, size=(40, 30))
        trimap = np.full((30, 40), 2, np.uint8)  # background
        trimap[5:20, 10:30] = 3  # border
        trimap[7:18, 12:28] = 1  # pet
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
    (root / "annotations" / "trainval.txt").write_text("\n".join(PETS_TRAINVAL) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(PETS_TEST) + "\n")
    return root


@pytest.fixture
def imagefolder_dir(tmp_path) -> Path:
    """train/<class>/*.jpg with 3, 2, 4 images; val/<class>/*.png with 1, 1, 2 images."""
    rng = np.random.default_rng(4)
    root = tmp_path / "imagenet"
    for split, counts, ext in (("train", (3, 2, 4), "jpg"), ("val", (1, 1, 2), "png")):
        for name, count in zip(("n01", "n02", "n03"), counts, strict=True):
            for i in range(count):
                write_jpeg(root / split / name / f"{name}_{i}.{ext}", rng)
    return root


@pytest.fixture
def voc_dir(tmp_path) -> Path:
    """VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    (folder / "SegmentationClass").mkdir(parents=True)
    (folder / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, items in VOC_ITEMS.items():
        for image_id, (left, right, left_width, right_width) in items.items():
            write_jpeg(folder / "JPEGImages" / f"{image_id}.jpg", rng, size=(48, 32))
            values = np.zeros((32, 48), np.uint8)
            values[4:28, 0:left_width] = left
            values[4:28, 48 - right_width :] = right if right_width else 0
            values[3, :] = 255  # void border line
            write_voc_map(folder / "SegmentationClass" / f"{image_id}.png", values)
        ids = "\n".join(items) + "\n"
        (folder / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
    return tmp_path / "voc"
