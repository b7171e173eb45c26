"""The dataset registry and `build_dataset`, the one way the engine and CLI make a dataset."""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from spatial_entropy.choices import SPLITS
from spatial_entropy.data.base import VisionDataset
from spatial_entropy.data.subsets import stratified_subset
from spatial_entropy.data.transforms import build_transform

_DATASETS: dict[str, type[VisionDataset]] = {}
# keyword arguments every dataset class takes; the rest of its keywords are its `options`
_COMMON = {"self", "root", "split", "with_masks", "skip_bad"}


def register_dataset(name: str) -> Callable[[type[VisionDataset]], type[VisionDataset]]:
    """Class decorator registering a `VisionDataset` subclass under ``name``."""

    def add(cls: type[VisionDataset]) -> type[VisionDataset]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = cls
        return cls

    return add


def dataset_names() -> list[str]:
    """Names accepted by `build_dataset`, sorted."""
    return sorted(_DATASETS)


def dataset_class(name: str) -> type[VisionDataset]:
    """The class registered as ``name``; ValueError listing the names if there is none."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, dataset_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; expected one of {dataset_names()}")
    return _DATASETS[name]


def dataset_options(name: str) -> list[str]:
    """Dataset-specific option names of ``name`` (what `build_dataset`'s ``options`` accepts):
    the keywords of its ``__init__``, and for a ``**kwargs`` the names its class lists in
    ``keyword_options``."""
    cls = dataset_class(name)
    parameters = inspect.signature(cls.__init__).parameters.values()
    named = [p.name for p in parameters if p.name not in _COMMON and p.kind != p.VAR_KEYWORD]
    return named + list(cls.keyword_options)


def build_dataset(
    name: str,
    split: str,
    *,
    data_path: str | os.PathLike | None = None,
    img_size: int | None = None,
    is_train: bool | None = None,
    augment: dict[str, Any] | None = None,
    n_per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    with_masks: bool = False,
    skip_bad: bool = False,
    options: dict[str, Any] | None = None,
) -> Dataset:
    """Make dataset ``name`` (see `dataset_names`), split ``split`` (train, val or test).

    Items are ``(image, label)``: a normalised float ``(C, img_size, img_size)`` tensor and an
    int; with ``with_masks`` ``(image, label, mask)``, mask ``(img_size, img_size)`` after the
    image's geometry (bool object mask, or uint8 class map with 255 = void for voc2012).
    The result has ``num_classes``, ``in_chans``, ``targets``, ``classes``, ``mean``, ``std``.

    Args:
        data_path: where the dataset's files are (format per dataset class docstring).
        img_size: output side; default the native side of small datasets, else 224.
        is_train: training (random) or eval transform; default ``split == "train"``.
        augment: recipe keys for the transform, see `build_transform`.
        n_per_class, fraction: keep a stratified subset (see `stratified_indices`), drawn
            with ``seed``.
        skip_bad: skip bad items (reported in ``skipped`` and a warning) instead of raising;
            for file-backed datasets this decodes every image once up front.
        options: dataset-specific keywords (see `dataset_options`), e.g. cluttered-fashion's
            ``distractors`` or fashion-mnist's ``in_chans``.
    """
    cls = dataset_class(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(dataset_options(name)))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for dataset {name!r}; expected some of "
            f"{dataset_options(name)}"
        )
    dataset = cls(data_path, split, with_masks=with_masks, skip_bad=skip_bad, **options)
    if skip_bad and dataset.samples:
        dataset.verify()
    dataset.transform = build_transform(
        img_size or dataset.native_size or 224,
        split == "train" if is_train is None else is_train,
        mean=dataset.mean,
        std=dataset.std,
        native_size=dataset.native_size,
        augment=augment,
        mask_fill=dataset.mask_fill,
    )
    if n_per_class is not None or fraction is not None:
        return stratified_subset(dataset, n_per_class=n_per_class, fraction=fraction, seed=seed)
    return dataset
