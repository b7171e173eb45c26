"""Fashion-MNIST: IDX files (gzip or plain) found locally, or downloaded on first use."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from spatial_entropy.data.base import DatasetError, DatasetNotFoundError, VisionDataset
from spatial_entropy.data.registry import register_dataset

logger = logging.getLogger(__name__)

SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
"""Where Debian's package ``dataset-fashion-mnist`` puts the files."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist, files in "
    "/usr/share/datasets/fashion-mnist/), or put the four IDX files "
    "(train-images-idx3-ubyte[.gz], ...) in a folder given as data_path / --data-path"
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def default_cache_dir() -> Path:
    """``$SPATIAL_ENTROPY_CACHE``, else ``$XDG_CACHE_HOME/spatial-entropy`` (~/.cache/...)."""
    if os.environ.get("SPATIAL_ENTROPY_CACHE"):
        return Path(os.environ["SPATIAL_ENTROPY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spatial-entropy"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed if the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); expected an IDX file") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: bad header; expected an IDX file (magic 0x0000 + type)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(np.frombuffer(data[4:header], dtype=">i4").tolist()) if ndim else ()
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(shape) != ndim or len(data) - header != expected:
        raise DatasetError(
            f"{path}: holds {max(len(data) - header, 0)} data bytes; its header "
            f"(shape {shape}) promises {expected} (truncated or corrupt file?)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidate_dirs(data_path: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_path is not None:
        root = Path(data_path)
        dirs += [root, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    dirs += list(SYSTEM_DIRS)
    dirs.append(default_cache_dir() / "FashionMNIST" / "raw")
    return dirs


def find_fashion_mnist(
    data_path: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """Folder holding the four Fashion-MNIST IDX files.

    Looks in ``data_path`` (also its ``fashion-mnist/`` and torchvision's ``FashionMNIST/raw/``),
    then Debian's ``/usr/share/datasets/fashion-mnist``, then the cache; if none has them and
    ``download`` is True, downloads with torchvision into ``data_path`` (or the cache).
    A folder holding only some of the files is an error naming the missing one.
    """
    stems = [stem for pair in FILES.values() for stem in pair]
    for folder in _candidate_dirs(data_path):
        found = {stem: _find_file(folder, stem) for stem in stems}
        if all(found.values()):
            return folder
        if any(found.values()):
            missing = next(stem for stem, path in found.items() if path is None)
            raise DatasetNotFoundError(
                f"{folder / missing}[.gz]: not found, but {folder} holds other Fashion-MNIST "
                "files; expected all four IDX files there"
            )
    if download:
        target = Path(data_path) if data_path is not None else default_cache_dir()
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
        except Exception as exc:  # no network, proxy, disk full: all end in the same advice
            # What to do first: the download's own error is long and says little.
            raise DatasetNotFoundError(
                f"Fashion-MNIST not found; {HOW_TO_GET}. Downloading it into {target} failed "
                f"too ({exc})"
            ) from exc
        return target / "FashionMNIST" / "raw"
    searched = ", ".join(str(d) for d in _candidate_dirs(data_path))
    raise DatasetNotFoundError(f"Fashion-MNIST not found (searched {searched}); {HOW_TO_GET}")


def fashion_mnist_files(folder: Path, split: str) -> tuple[Path, Path]:
    """(images, labels) IDX paths of ``split`` ("train" or "test") inside ``folder``."""
    paths = tuple(_find_file(folder, stem) for stem in FILES[split])
    if None in paths:
        raise DatasetNotFoundError(f"{folder}: Fashion-MNIST {split} files not found")
    return paths  # type: ignore[return-value]


def read_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64, shapes checked (not labels)."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path}: array of shape {images.shape} ({images.dtype}); "
            "expected (N, H, W) uint8 images"
        )
    if labels.shape != (len(images),):
        raise DatasetError(
            f"{labels_path}: {labels.shape} labels; expected ({len(images)},) to match "
            f"{images_path}"
        )
    return images, labels.astype(np.int64)


def load_fashion_mnist(
    split: str, data_path: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as images ``(N, 28, 28)`` uint8
    and labels ``(N,)`` int64; every label checked to lie in 0..9."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST splits are {sorted(FILES)}; got {split!r}")
    images_path, labels_path = fashion_mnist_files(
        find_fashion_mnist(data_path, download=download), split
    )
    images, labels = read_fashion_mnist(images_path, labels_path)
    bad = np.flatnonzero((labels < 0) | (labels >= len(CLASSES)))
    if len(bad):
        raise DatasetError(
            f"{labels_path}: label {labels[bad[0]]} of item {bad[0]} is out of range; "
            f"expected 0..{len(CLASSES) - 1}"
        )
    return images, labels


@register_dataset("fashion-mnist")
class FashionMNIST(VisionDataset):
    """Fashion-MNIST, 10 classes of 28x28 grey clothing images (60k train, 10k test).

    ``val`` and ``test`` both name the 10k test set (there is no separate validation set).
    Images have one channel; ``in_chans=3`` replicates it to RGB (mean/std repeated).
    Lookup order of the files: see `find_fashion_mnist`.
    """

    splits = {"train": "train", "val": "test", "test": "test"}
    native_size = 28

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
        in_chans: int = 1,
        download: bool = True,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        self._grey_channels(in_chans, 0.2860, 0.3530)
        self.classes = list(CLASSES)
        folder = find_fashion_mnist(root, download=download)
        images_path, labels_path = fashion_mnist_files(folder, self.splits[split])
        images, labels = read_fashion_mnist(images_path, labels_path)
        keep = []
        for index, label in enumerate(labels.tolist()):
            if 0 <= label < len(CLASSES):
                keep.append(index)
            else:
                self._reject(
                    f"{labels_path}: label {label} of item {index} is out of range; "
                    f"expected 0..{len(CLASSES) - 1}"
                )
        self.images = images[keep] if len(keep) < len(labels) else images
        self.targets = labels[keep].tolist()
        self._report_skipped()

    def load(self, index: int) -> tuple[Image.Image, None]:
        return self._grey_image(self.images[index]), None
