"""Writers of miniature datasets in their real on-disk formats (used by the data tests)."""

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_PER_CLASS = {"train": 30, "test": 25}


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: 2 zero bytes, type code (0x08 = uint8), ndim, big-endian int32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def fashion_arrays(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake items: a bright rectangle on an exact-zero background, like Fashion-MNIST's."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), FASHION_PER_CLASS[split])
    rng.shuffle(labels)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for image in images:
        top, left = rng.integers(2, 8, 2)
        bottom, right = rng.integers(20, 27, 2)
        image[top:bottom, left:right] = rng.integers(60, 256, (bottom - top, right - left))
    return images, labels.astype(np.uint8)


def write_jpeg(path: Path, rng: np.random.Generator, size=(40, 30)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return pixels


PETS_TRAINVAL = ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1", "Abyssinian_2 1 1 1"]
PETS_TEST = ["american_bulldog_3 2 2 1", "yorkshire_terrier_7 37 2 25"]


def voc_palette() -> list[int]:
    """VOC's colour map (bit-interleaved), as PIL palette entries."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc_map(path: Path, values: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette(voc_palette())
    image.save(path)


# image id -> (object class in the left part, object class in the right part, their widths)
VOC_ITEMS = {
    "train": {"2007_000032": (1, 15, 10, 20), "2007_000039": (20, 0, 25, 0)},
    "val": {"2007_000033": (8, 12, 5, 30), "2008_000001": (3, 3, 12, 12)},
}
