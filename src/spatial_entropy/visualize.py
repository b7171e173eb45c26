"""Pictures: [CLS] attention overlays against object masks, and training curves from log.csv."""

from __future__ import annotations

import csv
import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import Tensor

from spatial_entropy.attention import AttentionCapture
from spatial_entropy.data.base import VOID, open_image, open_object_mask
from spatial_entropy.distributed import resolve_device
from spatial_entropy.evaluation import (
    attention_jaccard,
    attention_masks,
    object_masks,
)
from spatial_entropy.runs import RunPaths, load_run

__all__ = [
    "TRAINING_PANELS",
    "attention_figure",
    "dataset_figure",
    "denormalize",
    "read_training_log",
    "run_attention_figure",
    "runs_training_figure",
    "save_figure",
    "training_figure",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Files that :func:`run_attention_figure` reads from an image folder."""

PANEL_INCHES = 1.4
"""Side of one image panel of :func:`attention_figure`, in inches."""

TRAINING_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("train_loss", "val_loss"),
    "spatial entropy": ("train_se", "val_se_mean"),
    "λ (SE weight)": ("se_weight",),
    "top-1 (%)": ("val_top1",),
}
"""Panel title -> ``log.csv`` columns that :func:`training_figure` draws in it."""


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the input normalisation for display: ``(B, C, H, W)`` -> values in ``[0, 1]``."""
    if images.dim() != 4 or images.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(
            f"Expected images (B, C, H, W) with C = len(mean) = len(std), but got shape "
            f"{tuple(images.shape)}, {len(mean)} means and {len(std)} stds"
        )
    mean_t = images.new_tensor(mean).view(1, -1, 1, 1)
    std_t = images.new_tensor(std).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def _show_image(ax, image: Tensor, dim: float = 1.0) -> None:
    pixels = image.detach().float().cpu().permute(1, 2, 0).numpy() * dim
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(pixels, interpolation="nearest")


def _outline(ax, mask: Tensor, color: str) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.cpu().numpy().astype(float), levels=[0.5], colors=color, linewidths=1.0)


def _object_panel(ax, mask: Tensor) -> None:
    """A boolean object mask in white, or a class map: classes in colours, void in grey."""
    values = mask.cpu().numpy()
    if values.dtype == bool:
        ax.imshow(values, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        return
    colours = colormaps["tab20"](values % 20)[..., :3]
    colours[values == 0] = 0.0
    colours[values == VOID] = 0.75
    ax.imshow(colours, interpolation="nearest")


def attention_figure(
    images: Tensor,
    runs: Mapping[str, tuple[Tensor, Sequence[int]]],
    masks: Tensor | None = None,
    *,
    mass: float = 0.6,
    row_labels: Sequence[str] | None = None,
) -> Figure:
    """One grid of attention pictures: a row per image, a group of columns per run.

    Columns: the input; for each run, each head's attention as a heatmap over the image (patch
    resolution, from the map's minimum to its maximum) with its ``mass`` mask outlined in cyan,
    then the ``mass`` mask itself (the image dimmed outside it): of the best head when object
    masks are known (the head with the highest Jaccard, which is printed on each panel), else
    of the attention averaged over heads; last, the object mask when known (outlined in green
    on the mask panels too).

    Args:
        images: ``(B, C, H, W)`` display images in ``[0, 1]`` (see :func:`denormalize`), C = 1
            or 3.
        runs: run name -> ``(attention, grid_shape)``, attention ``(B, heads, gh * gw)``
            post-softmax [CLS] attention over the patches, e.g. ``{"baseline": ...,
            "spatial entropy": ...}``.
        masks: ``(B, H, W)`` boolean object masks or class maps (255 = void), or None.
        mass: share of the attention mass a mask keeps.
        row_labels: one text per image, shown left of its row.

    Returns:
        The matplotlib figure (no pyplot state is involved), ``B`` rows of
        ``1 + sum(heads + 1) + (masks is not None)`` panels.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Expected images (B, 1 or 3, H, W), but got {tuple(images.shape)}")
    if not runs:
        raise ValueError("Expected at least one run's attention")
    count, size = images.shape[0], tuple(images.shape[-2:])
    for name, (attention, _) in runs.items():
        if attention.shape[0] != count:
            raise ValueError(
                f"run {name!r} has attention for {attention.shape[0]} of {count} images"
            )
    if masks is not None and tuple(masks.shape) != (count, *size):
        raise ValueError(f"Expected masks of shape {(count, *size)}, got {tuple(masks.shape)}")
    if row_labels is not None and len(row_labels) != count:
        raise ValueError(f"Expected {count} row labels, got {len(row_labels)}")

    columns = 1 + sum(attention.shape[1] + 1 for attention, _ in runs.values())
    columns += masks is not None
    fig = Figure(figsize=(columns * PANEL_INCHES, count * PANEL_INCHES + 0.4), layout="constrained")
    axes = np.asarray(fig.subplots(count, columns, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    titles = ["input"]
    for name, (attention, grid_shape) in runs.items():
        heads = attention.shape[1]
        label = _wrap(name)
        titles += [f"{label}\nhead {h}" for h in range(heads)] + [f"{label}\n{mass:.0%} mask"]
        attention = attention.detach().float().cpu()
        head_masks = attention_masks(attention, grid_shape, size, mass=mass)
        if masks is not None:
            _, per_head = attention_jaccard(attention, grid_shape, masks.cpu(), mass=mass)
            best = per_head.nan_to_num(-1.0).argmax(dim=1)
            shown = head_masks[torch.arange(count), best]
        else:
            per_head = None
            shown = attention_masks(attention.mean(1, keepdim=True), grid_shape, size, mass=mass)
            shown = shown[:, 0]
            for b in range(count):
                axes[b, len(titles) - 1].set_xlabel("mean of heads", fontsize=7, labelpad=1)
        start = len(titles) - heads - 1
        for b in range(count):
            for h in range(heads):
                ax = axes[b, start + h]
                _show_image(ax, images[b])
                heat = attention[b, h].reshape(*grid_shape).numpy()
                # Each map spans the whole colour range, as in DINO's pictures: a near-uniform
                # map of an untrained model would otherwise be one flat colour.
                heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
                ax.imshow(
                    heat,
                    cmap="inferno", alpha=0.6, vmin=0.0, vmax=1.0, interpolation="nearest",
                    extent=(-0.5, size[1] - 0.5, size[0] - 0.5, -0.5),
                )  # fmt: skip
                _outline(ax, head_masks[b, h], "cyan")
                if per_head is not None and not math.isnan(per_head[b, h]):
                    ax.set_xlabel(f"J {per_head[b, h]:.2f}", fontsize=7, labelpad=1)
            ax = axes[b, start + heads]
            kept = shown[b].to(images.dtype).cpu()
            _show_image(ax, images[b].cpu() * (0.25 + 0.75 * kept))
            _outline(ax, shown[b], "cyan")
            if per_head is not None:
                _outline(ax, object_masks(masks[b].cpu())[0].any(dim=0), "lime")
                if not math.isnan(per_head[b, best[b]]):
                    ax.set_xlabel(
                        f"head {best[b]}: J {per_head[b, best[b]]:.2f}", fontsize=7, labelpad=1
                    )
    if masks is not None:
        titles.append("object mask")
    for b in range(count):
        _show_image(axes[b, 0], images[b])
        if masks is not None:
            _object_panel(axes[b, -1], masks[b])
        if row_labels is not None:
            axes[b, 0].set_ylabel(row_labels[b], fontsize=7)
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize=7)
    return fig


def dataset_figure(dataset: Any, count: int = 16) -> Figure:
    """A grid of ``count`` evenly spaced items of a dataset, for a look at what it holds.

    Each panel shows the un-normalised image (:func:`denormalize`), titled with its class, and
    outlines its objects in red when the items carry masks (see ``object_masks``: for class
    maps every class but background and void).

    Args:
        dataset: a ``VisionDataset`` (or a subset of one) with ``mean``, ``std`` and
            ``classes``, whose items are ``(image, label)`` or ``(image, label, mask)``.
        count: how many items to draw (fewer if the dataset is smaller).

    Returns:
        The matplotlib figure, about square.

    Raises:
        ValueError: if the dataset is empty.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty; nothing to draw")
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round())
    columns = math.ceil(math.sqrt(len(indices)))
    rows = math.ceil(len(indices) / columns)
    fig = Figure(figsize=(1.6 * columns, 1.8 * rows), layout="tight")
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False))
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices.astype(int).tolist(), strict=False):
        image, label, *mask = dataset[index]
        _show_image(ax, denormalize(image[None], dataset.mean, dataset.std)[0])
        if mask:
            _outline(ax, object_masks(mask[0])[0].any(dim=0), "red")
        name = dataset.classes[label] if dataset.classes else str(label)
        ax.set_title(name[:18], fontsize=7)
    return fig


def _wrap(name: str, width: int = 18) -> str:
    """A run name on lines short enough for one panel (paths break after their slashes)."""
    return "\n".join(textwrap.wrap(name.replace("/", "/ "), width)).replace("/ ", "/")


def read_training_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a run's ``log.csv`` as column name -> float array; empty cells become NaN."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows; has the run finished an epoch?")

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {key: np.array([number(row.get(key)) for row in rows]) for key in rows[0]}


def training_figure(logs: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[Figure, list[str]]:
    """Curves of one or more runs per epoch: one panel per entry of :data:`TRAINING_PANELS`.

    Args:
        logs: run name -> columns (see :func:`read_training_log`); every run needs ``epoch``.

    Returns:
        ``(figure, missing)``: ``missing`` names each panel column that no run logged (the
        panel says so too), e.g. ``train_se`` for a run without the regulariser.
    """
    for name, columns in logs.items():
        if "epoch" not in columns:
            raise ValueError(f"run {name!r}: log has no 'epoch' column; got {sorted(columns)}")
    fig = Figure(figsize=(4.0 * len(TRAINING_PANELS), 3.2), layout="constrained")
    axes = fig.subplots(1, len(TRAINING_PANELS), squeeze=False)[0]
    missing = []
    for ax, (title, keys) in zip(axes, TRAINING_PANELS.items(), strict=True):
        drawn = False
        for key in keys:
            found = False
            for name, columns in logs.items():
                values = columns.get(key)
                if values is None or np.isnan(values).all():
                    continue
                found = drawn = True
                label = f"{name} {key}" if len(logs) > 1 else key
                style = "--" if key.startswith("val_") and len(keys) > 1 else "-"
                ax.plot(columns["epoch"] + 1, values, style, marker=".", label=label)
            if not found:
                missing.append(key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged:\n" + ", ".join(keys), ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
    return fig, missing


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` as an image (format from the suffix, e.g. PNG)."""
    fig.savefig(path, dpi=dpi)


def _folder_images(
    folder: Path,
    transform,
    in_chans: int,
    count: int,
    masks_dir: Path | None = None,
    void_value: int | None = None,
) -> tuple[Tensor, list[str], Tensor | None]:
    """The first ``count`` images of ``folder`` (by file name) through ``transform``, their
    names, and with ``masks_dir`` their object masks ``masks_dir/<stem>.png`` (0/1/255 maps,
    see `open_object_mask`; pixels equal to ``void_value`` are void)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise FileNotFoundError(f"{folder}: no images (expected files ending in {IMAGE_SUFFIXES})")
    mode = "L" if in_chans == 1 else "RGB"
    images, masks, resized = [], [], []
    for path in files:
        image = open_image(path, mode)
        mask = None
        if masks_dir is not None:
            mask_path = masks_dir / f"{path.stem}.png"
            if not mask_path.is_file():
                raise FileNotFoundError(f"{mask_path}: mask file not found for {path}")
            mask, was_resized = open_object_mask(mask_path, image.size, void_value=void_value)
            if was_resized:
                resized.append(mask_path)
        tensor, mask = transform(image, mask)
        images.append(tensor)
        masks.append(mask)
    if resized:
        warnings.warn(
            f"{len(resized)} mask(s) differ in size from their image (first: {resized[0]}); "
            "resized with nearest neighbour",
            stacklevel=3,
        )
    stacked = torch.stack(masks) if masks_dir is not None else None
    return torch.stack(images), [path.name for path in files], stacked


def run_names(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Short names for runs: the fewest trailing path parts that tell them all apart.

    Example:
        >>> run_names(["runs/a/seed1", "runs/b/seed1", "runs/c"])
        ['a/seed1', 'b/seed1', 'c']
    """
    paths = [Path(p).resolve() for p in run_dirs]
    names = []
    for path in paths:
        others = [p for p in paths if p != path]
        for depth in range(1, len(path.parts) + 1):
            name = "/".join(path.parts[-depth:])
            if all("/".join(p.parts[-depth:]) != name for p in others):
                break
        names.append(name)
    return names


@torch.no_grad()
def run_attention_figure(
    run_dirs: Sequence[str | os.PathLike],
    *,
    images_dir: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    split: str = "test",
    count: int = 8,
    mass: float = 0.6,
    device: str = "auto",
    void_value: int | None = None,
) -> Figure:
    """:func:`attention_figure` of trained runs on the same images, side by side.

    Args:
        run_dirs: one run, or several to compare (e.g. baseline, then regularised); all must
            take the same inputs (dataset, image size, channels).
        images_dir: a folder of images (the first ``count`` by file name), prepared with the
            first run's evaluation transform; None takes the first ``count`` items of ``split``
            (with object masks when the dataset has them).
        masks_dir: object masks of the ``images_dir`` images, ``<stem>.png`` each (0 =
            background, any other value = object); their outline is drawn.
        split: the dataset split to show without ``images_dir``.
        count: at most this many images (rows).
        mass: share of the attention mass the masks keep.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        void_value: the ``masks_dir`` pixel value that marks ignored pixels (e.g. 255 for
            VOC-style borders): drawn as void, left out of the Jaccard.
    """
    if not run_dirs:
        raise ValueError("Expected at least one run directory")
    if count < 1:
        raise ValueError(f"Expected count >= 1, got {count}")
    if masks_dir is not None and images_dir is None:
        raise ValueError(
            "masks_dir (--masks) needs images_dir (--images): the masks of which images?"
        )
    if void_value is not None and (masks_dir is None or void_value <= 0):
        raise ValueError(
            f"void_value (--void-value) needs masks_dir (--masks) and a positive pixel value "
            f"(0 is background); got {void_value}"
        )
    device = resolve_device(device)
    runs = {}
    images = masks = row_labels = dataset = None
    for run_dir, run_name in zip(map(Path, run_dirs), run_names(run_dirs), strict=True):
        # The dataset's own masks are drawn only when its items are shown.
        model, run_dataset, config = load_run(run_dir, split, with_masks=images_dir is None)
        if dataset is None:
            dataset = run_dataset
            if images_dir is not None:
                images, row_labels, masks = _folder_images(
                    Path(images_dir),
                    dataset.transform,
                    dataset.in_chans,
                    count,
                    None if masks_dir is None else Path(masks_dir),
                    void_value,
                )
            else:
                items = [dataset[i] for i in range(min(count, len(dataset)))]
                images = torch.stack([item[0] for item in items])
                masks = torch.stack([item[2] for item in items]) if len(items[0]) > 2 else None
                row_labels = [f"#{i} {dataset.classes[item[1]]}" for i, item in enumerate(items)]
        elif run_dataset[0][0].shape != images.shape[1:]:
            raise ValueError(
                f"{run_dir} takes other inputs than {run_dirs[0]}; compared runs need the same "
                "dataset, image size and channels"
            )
        with AttentionCapture(model) as capture:
            model.to(device)(images.to(device))
        weight = config.se.weight
        runs[f"{run_name} ({f'SE {weight:g}' if weight > 0 else 'no SE'})"] = (
            capture.attention.cpu(),
            capture.grid_shape,
        )
    display = denormalize(images, dataset.mean, dataset.std)
    return attention_figure(display, runs, masks, mass=mass, row_labels=row_labels)


def runs_training_figure(run_dirs: Sequence[str | os.PathLike]) -> tuple[Figure, list[str]]:
    """:func:`training_figure` of the ``log.csv`` of one or more runs, named by directory."""
    logs = {}
    for run_dir, name in zip(map(Path, run_dirs), run_names(run_dirs), strict=True):
        path = RunPaths(run_dir).log
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; is {run_dir} a run directory?")
        logs[name] = read_training_log(path)
    return training_figure(logs)
