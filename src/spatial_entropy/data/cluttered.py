"""The cluttered Fashion-MNIST benchmark: seeded 64x64 scenes with an exact object mask.

Each scene (see docs/benchmarks.md, section 2): a random crop of one of scikit-image's
bundled photographs in grey, resized to the canvas and dimmed (x0.6); ``distractors`` (default 4)
random 10x10 fragments of other Fashion-MNIST items of any class, placed so that each fragment's
10x10 window covers at most ``max_overlap`` (10%) of object pixels; on top, one Fashion-MNIST
item rescaled to a random side in [24, 40] px at a uniformly random position, pasted where its
pixel value exceeds 0.05 (the alpha). Training scenes use items of Fashion-MNIST's train split,
test scenes items of its test split; every item is used at most once per set and the classes
are balanced. Everything is vectorised with numpy / torch: 10,000 scenes take a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import skimage.color
import skimage.data
import skimage.transform
import torch
import torch.nn.functional as F
from PIL import Image

from spatial_entropy.data.base import VisionDataset
from spatial_entropy.data.fashion_mnist import CLASSES, default_cache_dir, load_fashion_mnist
from spatial_entropy.data.registry import register_dataset
from spatial_entropy.files import atomic_write

BACKGROUNDS = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "rocket",
    "text",
)
"""scikit-image photographs shipped inside its wheel (no download), all CC0 or public domain."""

GENERATOR_VERSION = 1
"""Part of the cache key: bump it whenever the generator's output for a seed changes."""

ARRAY_NAMES = ("images", "labels", "masks", "boxes", "clutter", "distractor_boxes", "source_index")
_SPLIT_STREAMS = {"train": 0, "test": 1}
_CANDIDATES = 16  # positions tried per distractor before settling for the least overlap
_CHUNK = 2048  # scenes rendered at once: bounds memory, leaves the random draws unchanged


@dataclass(frozen=True)
class SceneSettings:
    """The scene recipe of cluttered-fashion (module doc): one definition for the generator,
    its cache key and the dataset's options.

    Attributes:
        canvas: side of the square scene in pixels.
        object_size: ``(low, high)``: the object's side is drawn from ``[low, high]`` pixels.
        distractors: fragments of other items per scene (0: none).
        fragment_size: side of a fragment in pixels, at most 28 (an item's side).
        dim: brightness factor of the background photograph.
        max_overlap: largest fraction of a fragment's window that may cover the object's mask
            (kept whenever one of 16 candidate positions allows it, else the least covering).

    Raises:
        ValueError: if the object or the fragments do not fit the canvas.
    """

    canvas: int = 64
    object_size: Sequence[int] = (24, 40)
    distractors: int = 4
    fragment_size: int = 10
    dim: float = 0.6
    max_overlap: float = 0.1

    def __post_init__(self) -> None:
        low, high = (int(v) for v in self.object_size)
        object.__setattr__(self, "object_size", (low, high))
        if not 1 <= low <= high <= self.canvas:
            raise ValueError(
                f"object_size must be (low, high) with 1 <= low <= high <= canvas={self.canvas}"
            )
        if not 1 <= self.fragment_size <= min(28, self.canvas) or self.distractors < 0:
            raise ValueError(
                "need distractors >= 0 and 1 <= fragment_size <= 28; got "
                f"distractors={self.distractors}, fragment_size={self.fragment_size}"
            )


SCENE_OPTIONS = tuple(f.name for f in fields(SceneSettings))
"""The keyword names of :class:`SceneSettings`, which the generator and the dataset accept."""


@functools.lru_cache(maxsize=4)
def background_photos(short_side: int) -> tuple[np.ndarray, ...]:
    """scikit-image's `BACKGROUNDS` as grey float32 arrays in [0, 1], short side ``short_side``."""
    photos = []
    for name in BACKGROUNDS:
        photo = getattr(skimage.data, name)()
        photo = skimage.color.rgb2gray(photo[..., :3]) if photo.ndim == 3 else photo / 255.0
        scale = short_side / min(photo.shape)
        shape = tuple(max(short_side, round(side * scale)) for side in photo.shape)
        photos.append(skimage.transform.resize(photo, shape, anti_aliasing=True).astype(np.float32))
    return tuple(photos)


def _crop_resize(photo: np.ndarray, top, left, side, canvas: int) -> np.ndarray:
    """Bilinear resample of the square crops ``(top, left, side)`` (each ``(k,)``) of ``photo``
    to ``(k, canvas, canvas)``; pixel centres are aligned as in ``align_corners=False``."""
    steps = (np.arange(canvas) + 0.5) / canvas
    ys = top[:, None] + steps[None] * side[:, None] - 0.5
    xs = left[:, None] + steps[None] * side[:, None] - 0.5
    y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    wy, wx = (ys - y0)[:, :, None], (xs - x0)[:, None, :]
    y1 = np.minimum(y0 + 1, photo.shape[0] - 1)[:, :, None]
    x1 = np.minimum(x0 + 1, photo.shape[1] - 1)[:, None, :]
    y0, x0 = y0[:, :, None], x0[:, None, :]
    top_row = photo[y0, x0] * (1 - wx) + photo[y0, x1] * wx
    bottom_row = photo[y1, x0] * (1 - wx) + photo[y1, x1] * wx
    return (top_row * (1 - wy) + bottom_row * wy).astype(np.float32)


def _render(
    source: np.ndarray, items: np.ndarray, draws: dict[str, np.ndarray], settings: SceneSettings
) -> dict[str, np.ndarray]:
    """Scenes of one chunk from the random draws already made for it (see `_draw`)."""
    canvas, fragment, dim = settings.canvas, settings.fragment_size, settings.dim
    max_overlap = settings.max_overlap
    n, num_distractors = draws["fragment_items"].shape
    photos = background_photos(2 * canvas)
    image = np.empty((n, canvas, canvas), np.float32)
    for photo_id in np.unique(draws["photo"]):
        group = np.flatnonzero(draws["photo"] == photo_id)
        image[group] = _crop_resize(
            photos[photo_id],
            draws["crop_top"][group],
            draws["crop_left"][group],
            draws["crop_side"][group],
            canvas,
        )
    image *= dim

    # the object: resized per size group; its alpha is the exact mask
    mask = np.zeros((n, canvas, canvas), bool)
    object_pixels = {}
    for side in np.unique(draws["size"]):
        group = np.flatnonzero(draws["size"] == side)
        small = torch.from_numpy(source[items[group], None].astype(np.float32) / 255)
        pixels = F.interpolate(small, size=(int(side),) * 2, mode="bilinear", antialias=True)
        pixels = pixels.squeeze(1).numpy()
        rows = draws["top"][group, None, None] + np.arange(side)[None, :, None]
        cols = draws["left"][group, None, None] + np.arange(side)[None, None, :]
        mask[group[:, None, None], rows, cols] = pixels > 0.05
        object_pixels[int(side)] = (group, rows, cols, pixels)

    # distractors: a 10x10 crop centred on a random non-zero pixel of another item, at the
    # first candidate position whose window holds few object pixels (integral image)
    height, width = source.shape[1:]
    flat = source[draws["fragment_items"].ravel()].reshape(n * num_distractors, height * width)
    flat = flat > 12  # the alpha rule, pixel / 255 > 0.05, on uint8
    counts = flat.sum(1)
    rank = np.minimum((draws["fragment_pixel"].ravel() * counts).astype(np.int64), counts - 1)
    centre = np.argmax(np.cumsum(flat, axis=1, dtype=np.int16) > rank[:, None], axis=1)
    crop_top = np.clip(centre // width - fragment // 2, 0, height - fragment)
    crop_left = np.clip(centre % width - fragment // 2, 0, width - fragment)
    span = np.arange(fragment)
    fragments = source[
        draws["fragment_items"].ravel()[:, None, None],
        crop_top[:, None, None] + span[None, :, None],
        crop_left[:, None, None] + span[None, None, :],
    ].reshape(n, num_distractors, fragment, fragment)
    fragments = fragments.astype(np.float32) / 255

    integral = np.zeros((n, canvas + 1, canvas + 1), np.int32)
    integral[:, 1:, 1:] = mask.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
    y, x = draws["positions"][..., 0], draws["positions"][..., 1]
    scene = np.arange(n)[:, None, None]
    covered = (
        integral[scene, y + fragment, x + fragment]
        - integral[scene, y, x + fragment]
        - integral[scene, y + fragment, x]
        + integral[scene, y, x]
    )
    acceptable = covered <= max_overlap * fragment * fragment
    choice = np.where(acceptable.any(-1), acceptable.argmax(-1), covered.argmin(-1))
    chosen = np.take_along_axis(draws["positions"], choice[..., None, None], axis=2)[:, :, 0]

    clutter = np.zeros_like(mask)
    rows_of = chosen[..., 0, None, None] + span[None, None, :, None]
    cols_of = chosen[..., 1, None, None] + span[None, None, None, :]
    scene = np.arange(n)[:, None, None]
    for d in range(num_distractors):
        rows, cols, piece = rows_of[:, d], cols_of[:, d], fragments[:, d]
        alpha = piece > 0.05
        image[scene, rows, cols] = np.where(alpha, piece, image[scene, rows, cols])
        clutter[scene, rows, cols] |= alpha

    boxes = np.zeros((n, 4), np.int16)
    for group, rows, cols, pixels in object_pixels.values():
        alpha = pixels > 0.05
        image[group[:, None, None], rows, cols] = np.where(
            alpha, pixels, image[group[:, None, None], rows, cols]
        )
        side = alpha.shape[1]
        row_any, col_any = alpha.any(2), alpha.any(1)
        boxes[group] = np.stack(
            [
                draws["left"][group] + col_any.argmax(1),
                draws["top"][group] + row_any.argmax(1),
                draws["left"][group] + side - col_any[:, ::-1].argmax(1),
                draws["top"][group] + side - row_any[:, ::-1].argmax(1),
            ],
            axis=1,
        )
    clutter &= ~mask
    distractor_boxes = np.concatenate([chosen[..., ::-1], chosen[..., ::-1] + fragment], -1)
    return {
        "images": np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8),
        "masks": mask,
        "boxes": boxes,
        "clutter": clutter,
        "distractor_boxes": distractor_boxes.astype(np.int16),
    }


def _draw(
    rng: np.random.Generator, labels: np.ndarray, n: int, settings: SceneSettings
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All random choices of a set, in one fixed order, so a seed fixes every byte."""
    canvas, object_size = settings.canvas, settings.object_size
    distractors, fragment = settings.distractors, settings.fragment_size
    num_classes = len(CLASSES)
    per_class = np.full(num_classes, n // num_classes)
    per_class[: n % num_classes] += 1
    chosen = []
    for label in range(num_classes):
        pool = np.flatnonzero(labels == label)
        if per_class[label] > len(pool):
            raise ValueError(
                f"{n} scenes need {per_class[label]} items of class {label}; the source split "
                f"has {len(pool)}"
            )
        chosen.append(rng.choice(pool, per_class[label], replace=False))
    items = np.concatenate(chosen)[rng.permutation(n)]
    photos = background_photos(2 * canvas)
    size = rng.integers(object_size[0], object_size[1] + 1, n)
    photo = rng.integers(0, len(photos), n)
    crop_side = rng.integers(canvas, 2 * canvas + 1, n)
    heights = np.array([p.shape[0] for p in photos])[photo]
    widths = np.array([p.shape[1] for p in photos])[photo]
    fragment_items = rng.integers(0, len(labels) - 1, (n, distractors))
    fragment_items += fragment_items >= items[:, None]  # never the object's own item
    draws = {
        "size": size,
        "top": rng.integers(0, canvas - size + 1),
        "left": rng.integers(0, canvas - size + 1),
        "photo": photo,
        "crop_side": crop_side,
        "crop_top": rng.integers(0, heights - crop_side + 1),
        "crop_left": rng.integers(0, widths - crop_side + 1),
        "fragment_items": fragment_items,
        "fragment_pixel": rng.random((n, distractors)),
        "positions": rng.integers(0, canvas - fragment + 1, (n, distractors, _CANDIDATES, 2)),
    }
    return items, draws


def generate_cluttered(
    n: int,
    split: str = "train",
    seed: int = 0,
    *,
    data_path: str | os.PathLike | None = None,
    scene: SceneSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    download: bool = True,
    **settings: Any,
) -> dict[str, np.ndarray]:
    """Generate (or load from the cache) ``n`` cluttered scenes, a pure function of the arguments.

    Args:
        n: number of scenes; classes are balanced (n // 10 each, the first n % 10 one more).
        split: Fashion-MNIST split the objects and fragments come from ("train" or "test").
        seed: generation seed; train and test draw from distinct streams of it.
        data_path: Fashion-MNIST location (see `find_fashion_mnist`).
        scene: the scene recipe, see :class:`SceneSettings` (default: its defaults).
        cache_dir: where the ``.npz`` goes (default `default_cache_dir`); written to a
            temporary file then renamed, so concurrent runs never read half a file.
        cache: read/write the cache at all.
        **settings: instead of ``scene``, its fields by name (``distractors=0, dim=0.0``).

    Returns:
        ``images`` (n, canvas, canvas) uint8, ``labels`` (n,) int64, ``masks`` (n, canvas,
        canvas) bool (the object's visible pixels), ``boxes`` (n, 4) int16 tight box of the mask
        as (x0, y0, x1, y1) with exclusive ends, ``clutter`` (n, canvas, canvas) bool (visible
        fragment pixels), ``distractor_boxes`` (n, distractors, 4) int16 fragment windows,
        ``source_index`` (n,) int64 index of the object in the Fashion-MNIST split.
    """
    if scene is not None and settings:
        raise ValueError(f"give scene or its fields {sorted(settings)}, not both")
    unknown = sorted(set(settings) - set(SCENE_OPTIONS))
    if unknown:
        raise TypeError(f"unknown scene setting(s) {unknown}; expected some of {SCENE_OPTIONS}")
    scene = scene if scene is not None else SceneSettings(**settings)
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be 'train' or 'test' (Fashion-MNIST's); got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    source, labels = load_fashion_mnist(split, data_path, download=download)
    # the cache key: every setting of the scenes, and the generator's version
    recipe = {"version": GENERATOR_VERSION, "n": n, "split": split, "seed": seed}
    recipe |= asdict(scene)
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode())
    digest.update(source.tobytes())
    digest.update(labels.tobytes())
    path = Path(cache_dir or default_cache_dir()) / "cluttered-fashion"
    path = path / f"{split}-n{n}-seed{seed}-{digest.hexdigest()[:16]}.npz"
    if cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                return {name: stored[name] for name in ARRAY_NAMES}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            warnings.warn(f"{path}: unreadable cache ({exc}); generating again", stacklevel=2)

    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    items, draws = _draw(rng, labels, n, scene)
    parts = [
        _render(
            source,
            items[start : start + _CHUNK],
            {key: value[start : start + _CHUNK] for key, value in draws.items()},
            scene,
        )
        for start in range(0, n, _CHUNK)
    ]
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    arrays["labels"] = labels[items]
    arrays["source_index"] = items.astype(np.int64)
    arrays = {name: arrays[name] for name in ARRAY_NAMES}
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write(path, buffer.getvalue(), mode=0o644)  # a cache may be shared
        except OSError as exc:
            warnings.warn(f"{path}: cannot write the cache ({exc}); continuing", stacklevel=2)
    return arrays


@register_dataset("cluttered-fashion")
class ClutteredFashion(VisionDataset):
    """The cluttered Fashion-MNIST benchmark (`generate_cluttered`), 10 classes, 64x64 grey.

    ``train`` is a pool of ``train_per_class`` scenes per class (default 1000, i.e. 10,000),
    from which ``build_dataset(..., n_per_class=n, seed=s)`` takes nested subsets; ``val`` and
    ``test`` name the fixed test set of ``test_size`` scenes (default 2000) from Fashion-MNIST's
    test split. Both are generated with ``generation_seed`` and cached in ``cache_dir``, else
    ``data_path``, else `default_cache_dir`. Masks are the bool object masks; ``in_chans=3``
    replicates the grey channel. The scene recipe's fields (:class:`SceneSettings`:
    ``distractors``, ``dim``, ...) are options too.
    """

    splits = {"train": "train", "val": "test", "test": "test"}
    mask_dtype = torch.bool
    keyword_options = SCENE_OPTIONS
    # measured over the default 2000-scene test set (generation_seed 0)
    grey_mean, grey_std = 0.3329, 0.2060

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        with_masks: bool = False,
        skip_bad: bool = False,
        train_per_class: int = 1000,
        test_size: int = 2000,
        generation_seed: int = 0,
        in_chans: int = 1,
        cache_dir: str | os.PathLike | None = None,
        download: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__(split, with_masks=with_masks, skip_bad=skip_bad)
        self._grey_channels(in_chans, self.grey_mean, self.grey_std)
        scene = SceneSettings(**settings)
        source_split = self.splits[split]
        self.arrays = generate_cluttered(
            train_per_class * len(CLASSES) if source_split == "train" else test_size,
            source_split,
            generation_seed,
            data_path=root,
            scene=scene,
            cache_dir=cache_dir or root,
            download=download,
        )
        self.native_size = scene.canvas
        self.classes = list(CLASSES)
        self.targets = self.arrays["labels"].tolist()

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        image = self._grey_image(self.arrays["images"][index])
        mask = None
        if self.with_masks:
            mask = Image.fromarray(self.arrays["masks"][index].astype(np.uint8), mode="L")
        return image, mask
