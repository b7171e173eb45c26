"""Oxford-IIIT Pets from its official files: ``images/`` and ``annotations/`` (+ trimaps)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from spatial_entropy.data.base import (
    DatasetNotFoundError,
    VisionDataset,
    open_image,
    open_label_map,
    require_data_path,
    require_path,
)
from spatial_entropy.data.registry import register_dataset

NUM_CLASSES = 37
TRIMAP_BACKGROUND = 2  # trimaps: 1 = pet, 2 = background, 3 = border


@register_dataset("pets")
class OxfordPets(VisionDataset):
    """Oxford-IIIT Pets (37 breeds; 3680 trainval, 3669 test images).

    ``data_path`` holds ``images/<Name>_<n>.jpg`` and ``annotations/trainval.txt`` /
    ``annotations/test.txt`` (lines ``<image name> <class id 1..37> <species> <breed id>``),
    or is the parent of torchvision's ``oxford-iiit-pet/``. ``train`` = trainval, ``val`` and
    ``test`` = test. Masks (``with_masks``) come from ``annotations/trimaps/<name>.png``:
    True on the pet and its border (trimap 1 and 3), False on the background (2).
    """

    splits = {"train": "trainval", "val": "test", "test": "test"}
    mask_dtype = torch.bool

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        root = require_data_path(root, "pets", "the folder with images/ and annotations/")
        folder = root / "oxford-iiit-pet"
        self.folder = folder if folder.is_dir() else root
        split_file = self.folder / "annotations" / f"{self.splits[split]}.txt"
        require_path(split_file, "Oxford-IIIT Pets' split file (lines: name class species breed)")
        names: dict[int, str] = {}
        lines = split_file.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or line.startswith("#"):
                continue
            where = f"{split_file}:{number}"
            if len(fields) < 2 or not fields[1].isdigit():
                self._reject(f"{where}: {line!r}; expected '<image name> <class id> ...'")
                continue
            name, class_id = fields[0], int(fields[1])
            image_path = self.folder / "images" / f"{name}.jpg"
            if not 1 <= class_id <= NUM_CLASSES:
                self._reject(
                    f"{where}: class id {class_id} out of range; expected 1..{NUM_CLASSES}"
                )
            elif not image_path.is_file():
                self._reject(
                    f"{image_path}: image file not found (listed at {where})", DatasetNotFoundError
                )
            else:
                names.setdefault(class_id, name.rsplit("_", 1)[0])
                self.samples.append(
                    (image_path, self.folder / "annotations" / "trimaps" / f"{name}.png")
                )
                self.targets.append(class_id - 1)
        # breed names come from the image names ("american_bulldog_12" -> "American Bulldog")
        self.classes = [
            " ".join(part.title() for part in names[i].split("_")) if i in names else f"class {i}"
            for i in range(1, NUM_CLASSES + 1)
        ]
        self._report_skipped()

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        image_path, trimap_path = self.samples[index]
        image = open_image(image_path)
        if not self.with_masks:
            return image, None
        mask = (open_label_map(trimap_path) != TRIMAP_BACKGROUND).astype(np.uint8)
        return image, Image.fromarray(mask)
