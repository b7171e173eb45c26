"""PASCAL VOC 2012 segmentation: images with class maps, for attention-vs-mask evaluation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from spatial_entropy.data.base import (
    VOID,
    DatasetError,
    DatasetNotFoundError,
    VisionDataset,
    open_image,
    open_label_map,
    require_data_path,
    require_path,
)
from spatial_entropy.data.registry import register_dataset

VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


@register_dataset("voc2012")
class VOC2012Segmentation(VisionDataset):
    """PASCAL VOC 2012 segmentation (1464 train, 1449 val images; 20 object classes).

    ``data_path`` is ``VOCdevkit/VOC2012`` or a folder above it, holding ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png`` (palette PNGs: 0 = background, 1..20 = classes, 255 = void)
    and ``ImageSets/Segmentation/{train,val}.txt``. ``test`` names ``val`` (VOC's test labels
    are not public).

    Labels: the object class covering most pixels of the map, as an index into ``classes``
    (the 20 object classes, so label = map value - 1). Masks (``with_masks``) are the uint8
    class maps themselves (``mask_classes`` names their values; 255 = void, also for padding).
    """

    splits = {"train": "train", "val": "val", "test": "val"}
    mask_dtype = torch.uint8
    mask_fill = VOID
    mask_classes = VOC_CLASSES

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        root = require_data_path(root, "voc2012", "VOCdevkit/VOC2012 or a folder above it")
        candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
        folder = next((c for c in candidates if (c / "ImageSets").is_dir()), candidates[0])
        ids_file = folder / "ImageSets" / "Segmentation" / f"{self.splits[split]}.txt"
        require_path(ids_file, "VOC 2012's segmentation split file (one image id per line)")
        self.classes = VOC_CLASSES[1:]
        for image_id in ids_file.read_text().split():
            image_path = folder / "JPEGImages" / f"{image_id}.jpg"
            map_path = folder / "SegmentationClass" / f"{image_id}.png"
            if not image_path.is_file():
                self._reject(
                    f"{image_path}: image file not found (listed in {ids_file})",
                    DatasetNotFoundError,
                )
                continue
            try:
                label = self._dominant_class(map_path)
            except DatasetError as exc:
                self._reject(str(exc))
                continue
            self.samples.append((image_path, map_path))
            self.targets.append(label)
        self._report_skipped()

    @staticmethod
    def _dominant_class(map_path: Path) -> int:
        """Index (0..19) of the object class with most pixels in the class map at ``map_path``."""
        values = open_label_map(map_path)
        counts = np.bincount(values.ravel(), minlength=256)
        invalid = np.flatnonzero(counts[len(VOC_CLASSES) : VOID])
        if len(invalid):
            raise DatasetError(
                f"{map_path}: class value {invalid[0] + len(VOC_CLASSES)} out of range; expected "
                f"0..{len(VOC_CLASSES) - 1} or {VOID} (void)"
            )
        objects = counts[1 : len(VOC_CLASSES)]
        if not objects.any():
            raise DatasetError(f"{map_path}: no object pixels; expected at least one class 1..20")
        return int(objects.argmax())

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        image_path, map_path = self.samples[index]
        image = open_image(image_path)
        if not self.with_masks:
            return image, None
        values = open_label_map(map_path)
        if values.shape != (image.height, image.width):
            raise DatasetError(
                f"{map_path}: {values.shape[1]}x{values.shape[0]} class map for a "
                f"{image.width}x{image.height} image {image_path}; expected equal sizes"
            )
        return image, Image.fromarray(values)
