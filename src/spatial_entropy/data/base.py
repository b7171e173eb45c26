"""Shared pieces of the dataset loaders: error types, image decoding and the base dataset."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SKIP_HINT = "pass skip_bad=True (CLI: --skip-bad) to skip such items and report their count"
VOID = 255
"""Mask value of pixels that count in no metric (VOC's object borders, padding, ``void_value``)."""
MASK_MODES = ("1", "L", "P", "I;16", "I;16L", "I;16B", "I")
"""PIL modes of an object mask: bilevel, greyscale (8 or 16 bit, or 32-bit integer), palette."""


class DatasetError(ValueError):
    """A dataset on disk is malformed or inconsistent; the message names the file."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A file or folder that a dataset needs does not exist; the message names it."""


def require_path(path: Path, expected: str) -> Path:
    """Return ``path`` if it exists, else raise `DatasetNotFoundError` saying what was expected."""
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: not found; expected {expected}")
    return path


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode the image at ``path`` fully and convert it to ``mode``.

    Decoding happens here, not lazily, so that a corrupt or truncated file fails with an error
    naming it instead of somewhere inside a transform. 16-bit greyscale images are scaled to
    8 bits (not clipped).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I"):
                # 16-bit greyscale (PNG): Pillow's convert clips every value above 255 to
                # white; scale 0..65535 to 0..255 instead.
                levels = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8), "L")
            return image.convert(mode)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: image file not found") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{path}: cannot decode image ({exc}); expected a readable image file"
        ) from exc


def open_label_map(path: Path) -> np.ndarray:
    """Read a PNG of class indices (palette or greyscale) as a ``(H, W)`` uint8 array."""
    try:
        with Image.open(path) as image:
            image.load()
            mode, values = image.mode, np.asarray(image).copy()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: label map not found") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot decode label map ({exc}); expected a PNG") from exc
    if mode not in ("P", "L"):
        raise DatasetError(
            f"{path}: mode {mode!r}; expected a palette ('P') or greyscale ('L') PNG whose "
            "pixel values are class indices"
        )
    return values.astype(np.uint8)


def open_object_mask(
    path: Path, size: tuple[int, int] | None = None, *, void_value: int | None = None
) -> tuple[Image.Image, bool]:
    """Read an object mask (0 = background, any other value = object) as a 0/1/`VOID` image.

    Args:
        path: a greyscale (8 or 16 bit) or palette PNG; palette masks are read as indices.
        size: ``(width, height)`` of the image the mask belongs to; a mask of another size is
            resized to it with nearest neighbour.
        void_value: pixel value that marks ignored pixels (e.g. 255 for VOC-style borders).

    Returns:
        ``(mask, resized)``: a PIL image of mode "L" holding 0 (background), 1 (object) and
        `VOID` (ignored), and whether it had to be resized to ``size``.

    Raises:
        DatasetNotFoundError: no file at ``path``.
        DatasetError: the file is not a readable image, or not of a greyscale/palette mode.
    """
    try:
        with Image.open(path) as mask:
            mask.load()
            mode, values = mask.mode, np.asarray(mask)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: mask file not found") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot decode mask ({exc}); expected a PNG") from exc
    if mode not in MASK_MODES:
        raise DatasetError(
            f"{path}: mask of mode {mode!r}; expected a greyscale or palette PNG "
            "(0 = background, any other value = object)"
        )
    labels = (values != 0).astype(np.uint8)
    if void_value is not None:
        labels[values == void_value] = VOID
    result = Image.fromarray(labels)
    resized = size is not None and result.size != tuple(size)
    if resized:
        result = result.resize(tuple(size), Image.Resampling.NEAREST)
    return result, resized


def require_data_path(root: str | os.PathLike | None, name: str, expected: str) -> Path:
    """``root`` as a Path, or the error that says which folder ``name`` needs."""
    if root is None:
        raise DatasetNotFoundError(f"{name} needs data_path (--data-path): {expected}")
    return Path(root)


class VisionDataset(Dataset):
    """Base of every loader: item ``i`` is ``(image, label)``, or ``(image, label, mask)``.

    Subclasses fill ``targets`` and ``classes`` in their constructor and implement `load`, which
    returns the raw PIL image (and PIL mask of mode ``"L"``). ``transform`` (see
    `spatial_entropy.data.transforms`) maps that pair to a float ``(C, H, W)`` tensor and an
    ``(H, W)`` mask tensor after the same geometry; without a transform items stay PIL images.

    Bad items found while indexing a dataset go through `_reject`: an error naming the file, or,
    with ``skip_bad=True``, a count in ``skipped`` (reasons in ``skipped_reasons``) and a warning.
    """

    splits: ClassVar[dict[str, str]] = {}
    """Requested split (train/val/test) -> name of the split on disk."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    in_chans: int = 3
    native_size: int | None = None
    """Side of every image when it is fixed (<= 64 selects the small-image recipe)."""
    mask_dtype: torch.dtype | None = None
    """dtype of the masks; None: the dataset has no masks (where masks are optional, as in
    imagefolder, `has_masks` says whether a given root has them)."""
    mask_fill: ClassVar[int] = 0
    """Mask value for pixels that padding adds (0 = background; VOC uses 255 = void)."""
    keyword_options: ClassVar[tuple[str, ...]] = ()
    """Options that ``__init__`` takes through ``**kwargs`` (its named keywords are options
    anyway), so that `dataset_options` can list and check them."""

    def __init__(self, split: str, *, with_masks: bool = False, skip_bad: bool = False) -> None:
        name = type(self).__name__
        if split not in self.splits:
            raise ValueError(f"{name} has splits {sorted(self.splits)}; got split={split!r}")
        if with_masks and self.mask_dtype is None:
            raise ValueError(
                f"{name} has no masks; masks come with cluttered-fashion, pets, voc2012 and "
                "imagefolder (from a masks/ folder)"
            )
        self.split = split
        self.with_masks = with_masks
        self.skip_bad = skip_bad
        self.transform: Callable[[Any, Any], tuple[Any, Any]] | None = None
        self.classes: list[str] = []
        self.targets: list[int] = []
        self.samples: list[Any] = []
        """Per-item records of file-backed datasets (paths), aligned with ``targets``."""
        self.skipped_reasons: list[str] = []

    def _grey_channels(self, in_chans: int, mean: float, std: float) -> None:
        """For datasets of grey images: give them to the model as ``in_chans`` 1, or 3 (the
        grey channel replicated, for RGB models), with ``mean``/``std`` repeated to match."""
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 (grey) or 3 (replicated RGB); got {in_chans}")
        self.in_chans = in_chans
        self.mean, self.std = (mean,) * in_chans, (std,) * in_chans

    def _grey_image(self, pixels: np.ndarray) -> Image.Image:
        """A uint8 ``(H, W)`` grey array as a PIL image with ``in_chans`` channels."""
        image = Image.fromarray(pixels, mode="L")
        return image.convert("RGB") if self.in_chans == 3 else image

    @classmethod
    def has_masks(cls, root: str | os.PathLike | None, **options: Any) -> bool:
        """Whether the dataset at ``root`` with ``options`` can give masks (``with_masks``).

        True when the dataset has masks (``mask_dtype``); datasets whose masks are optional
        (imagefolder) also look at ``root``. Code that wants masks wherever they exist (a
        run's evaluation) asks this instead of failing on a dataset without them.
        """
        return cls.mask_dtype is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> int:
        """Number of items left out because they were bad (only with ``skip_bad=True``)."""
        return len(self.skipped_reasons)

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        """Raw image of item ``index`` and, when ``with_masks``, its mask (PIL mode "L")."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
            if mask is not None:
                mask = mask.to(self.mask_dtype)
        label = self.targets[index]
        return (image, label, mask) if self.with_masks else (image, label)

    def _reject(self, reason: str, error: type[DatasetError] = DatasetError) -> None:
        """Raise ``error`` for a bad item, or record it when skipping bad items."""
        if not self.skip_bad:
            raise error(f"{reason}; {SKIP_HINT}")
        self.skipped_reasons.append(reason)

    def _report_skipped(self) -> None:
        if self.skipped:
            warnings.warn(
                f"{type(self).__name__} ({self.split}): skipped {self.skipped} bad item(s); "
                f"first: {self.skipped_reasons[0]}",
                stacklevel=3,
            )

    def verify(self) -> None:
        """Decode every item once, so a corrupt file is found now rather than mid-training.

        Raises `DatasetError` naming the first bad file, or with ``skip_bad=True`` drops the
        bad items (see `_keep`) and reports their count. Costs one full pass over the files.
        """
        keep = []
        reasons = len(self.skipped_reasons)
        for index in range(len(self)):
            try:
                self.load(index)
            except DatasetError as exc:
                self._reject(str(exc), type(exc))
            else:
                keep.append(index)
        if len(self.skipped_reasons) > reasons:
            self._keep(keep)
            self._report_skipped()

    def _keep(self, indices: Sequence[int]) -> None:
        """Keep only the items at ``indices`` of ``samples`` and ``targets``."""
        self.samples = [self.samples[i] for i in indices]
        self.targets = [self.targets[i] for i in indices]
