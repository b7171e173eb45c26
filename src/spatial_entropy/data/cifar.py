"""CIFAR-10 and CIFAR-100 from their python pickle batches (the official "python version")."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from spatial_entropy.data.base import (
    DatasetError,
    DatasetNotFoundError,
    VisionDataset,
    require_data_path,
)
from spatial_entropy.data.registry import register_dataset

# The only globals that CIFAR batches (Python 2 pickles of dicts, lists, bytes, str, int and
# numpy arrays) or their Python 3 re-saves reference. numpy 2 calls `numpy.core` `numpy._core`.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # bytes in protocol 2 pickles written by Python 3
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds: a plain pickle.load of a file
    from an untrusted folder could call any importable function."""

    def find_class(self, module: str, name: str) -> Any:
        if (module.replace("numpy._core.", "numpy.core.", 1), name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists, dicts, bytes, str and int"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1 reads the original Python 2 pickles; keys may then be str or bytes
            content = _BatchUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{path}: not found; expected a CIFAR pickle batch") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: cannot unpickle ({exc}); expected a CIFAR batch") from exc
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: holds a {type(content).__name__}; expected a dict batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DatasetError(f"{path}: no {key!r} entry; expected keys like {sorted(batch)}")
    return batch[key]


@register_dataset("cifar10")
class CIFAR10(VisionDataset):
    """CIFAR-10 (50k train, 10k test, 32x32 RGB, 10 classes).

    ``data_path`` is the folder that ``cifar-10-python.tar.gz`` extracts to
    (``cifar-10-batches-py/`` with ``data_batch_1..5``, ``test_batch``, ``batches.meta``) or its
    parent. ``val`` and ``test`` both name the test batch, as in DeiT's CIFAR runs.
    """

    splits = {"train": "train", "val": "test", "test": "test"}
    native_size = 32
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    folder: ClassVar[str] = "cifar-10-batches-py"
    files: ClassVar[dict[str, list[str]]] = {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
    }
    meta_file: ClassVar[str] = "batches.meta"
    label_key: ClassVar[str] = "labels"
    names_key: ClassVar[str] = "label_names"

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
            root, type(self).__name__, f"the extracted {self.folder}/ folder or its parent"
        )
        folder = root / self.folder
        folder = folder if folder.is_dir() else Path(root)
        meta_path = folder / self.meta_file
        if not meta_path.is_file():
            raise DatasetNotFoundError(
                f"{meta_path}: not found; expected the extracted {self.folder}/ folder "
                f"(with {self.meta_file}) in {root}"
            )
        self.classes = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in _field(_unpickle(meta_path), self.names_key, meta_path)
        ]
        images, targets = [], []
        for name in self.files[self.splits[split]]:
            path = folder / name
            batch = _unpickle(path)
            data = np.asarray(_field(batch, "data", path))
            labels = [int(v) for v in _field(batch, self.label_key, path)]
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DatasetError(
                    f"{path}: 'data' is {data.dtype} of shape {data.shape}; expected uint8 "
                    "(N, 3072) rows of 32x32 RGB pixels in channel-major order"
                )
            if len(labels) != len(data):
                raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images")
            for index, label in enumerate(labels):
                if 0 <= label < len(self.classes):
                    images.append(data[index])
                    targets.append(label)
                else:
                    self._reject(
                        f"{path}: label {label} of item {index} is out of range; "
                        f"expected 0..{len(self.classes) - 1}"
                    )
        self.images = np.asarray(images, np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self.targets = targets
        self._report_skipped()

    def load(self, index: int) -> tuple[Image.Image, None]:
        return Image.fromarray(self.images[index]), None


@register_dataset("cifar100")
class CIFAR100(CIFAR10):
    """CIFAR-100 (50k train, 10k test, 32x32 RGB, 100 fine classes).

    ``data_path`` is the extracted ``cifar-100-python/`` (``train``, ``test``, ``meta``) or its
    parent. ``val`` and ``test`` both name the test file.
    """

    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    folder = "cifar-100-python"
    files = {"train": ["train"], "test": ["test"]}
    meta_file = "meta"
    label_key = "fine_labels"
    names_key = "fine_label_names"
