"""ImageFolder trees (``train/<class>/*.jpg``, ``val/<class>/*.jpg``): ImageNet-1k, ImageNet-100."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from spatial_entropy.data.base import (
    DatasetNotFoundError,
    VisionDataset,
    open_image,
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
    """

    splits = {"train": "train", "val": "val", "test": "test"}

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
        classes_file: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        root = require_data_path(root, "imagefolder", "the folder with train/ and val/")
        folder = root / split
        if split == "test" and not folder.is_dir():
            folder = root / "val"
        require_path(folder, f"a folder of class folders for the {split!r} split")
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
            self.samples += images
            self.targets += [index_of[name]] * len(images)
        if ignored:
            warnings.warn(
                f"{folder}: left out {len(ignored)} file(s) without an image extension "
                f"(first: {ignored[0]})",
                stacklevel=2,
            )
        self._report_skipped()

    def load(self, index: int) -> tuple[Image.Image, None]:
        return open_image(self.samples[index]), None
