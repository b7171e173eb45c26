"""ImageFolder trees (``train/<class>/*.jpg``, ``val/<class>/*.jpg``), optionally with masks."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from spatial_entropy.data.base import (
    VOID,
    DatasetNotFoundError,
    VisionDataset,
    open_image,
    open_object_mask,
    require_data_path,
    require_path,
)
from spatial_entropy.data.registry import register_dataset


def _class_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@register_dataset("imagefolder")
class ImageFolder(VisionDataset):
    """A tree ``<data_path>/<split>/<class name>/<image>`` (any depth below the class folder).

    Classes are the folder names of ``train/`` (sorted), so every split shares one label
    numbering; a class folder in ``val/`` unknown to ``train/`` or an empty class folder is an
    error. ``test`` reads ``test/`` when it exists, else ``val/`` (ImageNet has no labelled
    test set). ``classes_file`` (one folder name per line) restricts the tree to those classes,
    e.g. ImageNet-100 from an ImageNet-1k tree. Files without an image extension
    (``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``) are left out with a warning.

    Masks (``with_masks``, for the attention-vs-object Jaccard) come from a tree mirroring the
    images, ``<data_path>/masks/<split>/<class>/<stem>.png`` or ``masks_path`` in its place:
    greyscale (8 or 16 bit) or palette PNGs, 0 = background, any other value = object, and
    ``void_value`` (e.g. 255 for VOC-style borders) = pixels to ignore. Items carry them as
    uint8 maps (0 background, 1 object, 255 void), the format of VOC's class maps. A missing
    mask is an error naming it (with ``skip_bad``: a skipped item); a mask whose size differs
    from its image's is resized with nearest neighbour, with one warning per dataset.
    """

    splits = {"train": "train", "val": "val", "test": "test"}
    mask_fill = VOID
    mask_dtype = torch.uint8  # masks are optional here: has_masks says where they exist

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
        classes_file: str | os.PathLike | None = None,
        masks_path: str | os.PathLike | None = None,
        void_value: int | None = None,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        if void_value is not None and (not isinstance(void_value, int) or void_value <= 0):
            raise ValueError(
                f"void_value must be a positive pixel value (0 is background); got {void_value!r}"
            )
        self.void_value = void_value
        self.resize_reported = False
        root = require_data_path(root, "imagefolder", "the folder with train/ and val/")
        folder = root / split
        if split == "test" and not folder.is_dir():
            folder = root / "val"
        require_path(folder, f"a folder of class folders for the {split!r} split")
        self.masks_folder = self.masks_root(root, masks_path) / folder.name
        if with_masks:
            require_path(
                self.masks_folder.parent,
                "a masks folder mirroring the images (masks/<split>/<class>/<stem>.png) or "
                "the masks_path option",
            )
        self.folder = folder
        reference = root / "train" if (root / "train").is_dir() else folder
        self.classes = _class_dirs(reference)
        if classes_file is not None:
            wanted = require_path(Path(classes_file), "a text file of class folder names")
            chosen = [line.strip() for line in wanted.read_text().splitlines() if line.strip()]
            missing = sorted(set(chosen) - set(self.classes))
            if missing:
                raise DatasetNotFoundError(
                    f"{classes_file}: classes {missing[:5]} have no folder in {reference}"
                )
            self.classes = sorted(chosen)
        if not self.classes:
            raise DatasetNotFoundError(f"{reference}: no class folders; expected <class>/<image>")
        index_of = {name: i for i, name in enumerate(self.classes)}
        ignored = []
        for name in _class_dirs(folder):
            if name not in index_of:
                if classes_file is None:
                    self._reject(
                        f"{folder / name}: class folder not in {reference}; expected one of its "
                        f"{len(self.classes)} class folders"
                    )
                continue
            files = sorted(p for p in (folder / name).rglob("*") if p.is_file())
            images = [p for p in files if p.suffix.lower() in IMG_EXTENSIONS]
            ignored += [p for p in files if p.suffix.lower() not in IMG_EXTENSIONS]
            if not images:
                self._reject(f"{folder / name}: empty class folder; expected image files")
            if with_masks:
                images = [p for p in images if self._has_mask(p)]
            self.samples += images
            self.targets += [index_of[name]] * len(images)
        if ignored:
            warnings.warn(
                f"{folder}: left out {len(ignored)} file(s) without an image extension "
                f"(first: {ignored[0]})",
                stacklevel=2,
            )
        self._report_skipped()

    @staticmethod
    def masks_root(root: Path, masks_path: str | os.PathLike | None = None) -> Path:
        """The folder holding ``<split>/<class>/<stem>.png`` masks: ``masks_path`` if given,
        else ``<root>/masks``."""
        return Path(masks_path) if masks_path is not None else root / "masks"

    @classmethod
    def has_masks(cls, root: str | os.PathLike | None, **options: Any) -> bool:
        """Whether the tree at ``root`` has a masks folder (``masks/`` or ``masks_path``)."""
        if root is None and options.get("masks_path") is None:
            return False
        return cls.masks_root(Path(root or "."), options.get("masks_path")).is_dir()

    def mask_path(self, image_path: Path) -> Path:
        """Where the mask of ``image_path`` (a file of this split) is expected."""
        return (self.masks_folder / image_path.relative_to(self.folder)).with_suffix(".png")

    def _has_mask(self, image_path: Path) -> bool:
        if self.mask_path(image_path).is_file():
            return True
        self._reject(
            f"{self.mask_path(image_path)}: mask file not found for {image_path}",
            DatasetNotFoundError,
        )
        return False

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        image_path = self.samples[index]
        image = open_image(image_path)
        if not self.with_masks:
            return image, None
        path = self.mask_path(image_path)
        mask, resized = open_object_mask(path, image.size, void_value=self.void_value)
        if resized and not self.resize_reported:
            self.resize_reported = True
            warnings.warn(
                f"{path}: mask size differs from its {image.width}x{image.height} image; "
                "resized with nearest neighbour (reported once; other such masks are resized "
                "too)",
                stacklevel=2,
            )
        return image, mask
