"""Oxford Flowers-102 from its official files: ``jpg/``, ``imagelabels.mat``, ``setid.mat``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from torchvision.datasets import Flowers102 as _TorchvisionFlowers

from spatial_entropy.data.base import (
    DatasetError,
    DatasetNotFoundError,
    VisionDataset,
    open_image,
    require_data_path,
    require_path,
)
from spatial_entropy.data.registry import register_dataset


def _load_mat(path: Path, key: str) -> np.ndarray:
    require_path(path, "one of Flowers-102's official .mat files")
    try:
        content = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as exc:
        # NotImplementedError: a MATLAB -v7.3 (HDF5) file, which scipy does not read
        raise DatasetError(
            f"{path}: cannot read ({exc}); expected a MATLAB .mat file up to v7 (the published "
            "files are v5; re-save a v7.3 one with -v7)"
        ) from exc
    if key not in content:
        raise DatasetError(f"{path}: no variable {key!r}; expected one holding integers")
    return np.asarray(content[key]).astype(np.int64).ravel()


@register_dataset("flowers102")
class Flowers102(VisionDataset):
    """Oxford Flowers-102 (102 classes; 1020 train, 1020 val, 6149 test images).

    ``data_path`` holds ``jpg/image_00001.jpg ...``, ``imagelabels.mat`` (``labels``, 1..102 per
    image) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: 1-based image ids), or is the
    parent of torchvision's ``flowers-102/`` folder with the same files. Class names are
    torchvision's.
    """

    splits = {"train": "trnid", "val": "valid", "test": "tstid"}

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        root = require_data_path(
            root, "flowers102", "the folder with jpg/, imagelabels.mat and setid.mat"
        )
        folder = root / "flowers-102"
        folder = folder if folder.is_dir() else Path(root)
        self.classes = list(_TorchvisionFlowers.classes)
        labels_path = folder / "imagelabels.mat"
        labels = _load_mat(labels_path, "labels")
        ids = _load_mat(folder / "setid.mat", self.splits[split])
        for image_id in ids.tolist():
            path = folder / "jpg" / f"image_{image_id:05d}.jpg"
            if not 1 <= image_id <= len(labels):
                self._reject(
                    f"{folder / 'setid.mat'}: image id {image_id} in {self.splits[split]!r} is "
                    f"out of range; expected 1..{len(labels)} (the images in {labels_path})"
                )
            elif not 1 <= labels[image_id - 1] <= len(self.classes):
                self._reject(
                    f"{labels_path}: label {labels[image_id - 1]} of image {image_id} is out of "
                    f"range; expected 1..{len(self.classes)}"
                )
            elif not path.is_file():
                self._reject(
                    f"{path}: image file not found (listed in setid.mat)", DatasetNotFoundError
                )
            else:
                self.samples.append(path)
                self.targets.append(int(labels[image_id - 1]) - 1)
        self._report_skipped()

    def load(self, index: int) -> tuple[Image.Image, None]:
        return open_image(self.samples[index]), None
