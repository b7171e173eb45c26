"""Evaluation in one pass: accuracy and [CLS] attention statistics (entropy, regions, Jaccard)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import accuracy as topk_accuracy
from torch import Tensor, nn

from spatial_entropy.attention import AttentionCapture
from spatial_entropy.checks import check_maps
from spatial_entropy.components import label_components
from spatial_entropy.data.base import VOID
from spatial_entropy.distributed import all_reduce_sum, cleanup_distributed, init_distributed
from spatial_entropy.entropy import foreground_weights, spatial_entropy
from spatial_entropy.loader import build_eval_loader
from spatial_entropy.runs import RunPaths, data_source, labels_match_run, load_run, write_json

__all__ = [
    "AttentionStatistics",
    "attention_jaccard",
    "attention_masks",
    "evaluate",
    "evaluate_attention",
    "evaluate_run",
    "jaccard_index",
    "map_statistics",
    "object_masks",
]


def attention_masks(
    attention: Tensor,
    grid_shape: Sequence[int],
    image_size: Sequence[int] | None = None,
    *,
    mass: float = 0.6,
) -> Tensor:
    """The patches holding ``mass`` of each attention map, as a boolean patch or pixel mask.

    DINO's protocol: renormalise each map over the patches, sort it, and keep the smallest set
    of top patches whose attention adds up to at least ``mass``. Patches tied with the last
    kept value are kept too, so the mask never depends on the order of the patches.

    Args:
        attention: ``(B, heads, N)`` non-negative attention over the patches (post-softmax),
            ``N = gh * gw`` in raster order.
        grid_shape: ``(gh, gw)``.
        image_size: ``(H, W)`` to upsample the mask to pixels (nearest neighbour); None keeps
            the patch grid.
        mass: share of the attention mass to keep, in ``(0, 1]``.

    Returns:
        Boolean ``(B, heads, gh, gw)``, or ``(B, heads, H, W)`` with ``image_size``.

    Example:
        >>> attention = torch.tensor([[[0.5, 0.25, 0.125, 0.125]]])
        >>> attention_masks(attention, (2, 2)).int().tolist()
        [[[[1, 1], [0, 0]]]]
    """
    gh, gw = check_maps(attention, grid_shape, "attention")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"Expected mass in (0, 1], but got {mass}")
    values = attention.detach().to(torch.float64)
    total = values.sum(dim=-1, keepdim=True)
    if bool((values < 0).any()) or not bool((total > 0).all()):
        raise ValueError("Expected non-negative attention maps with a positive sum over patches")
    ordered = (values / total).sort(dim=-1, descending=True).values
    # A patch is needed while the mass of the patches ranked above it is still short of `mass`.
    mass_above = ordered.cumsum(dim=-1) - ordered
    kept = (mass_above < mass).sum(dim=-1, keepdim=True)
    threshold = ordered.gather(-1, kept - 1)
    masks = (values / total >= threshold).reshape(*attention.shape[:2], gh, gw)
    if image_size is None:
        return masks
    size = tuple(int(s) for s in image_size)
    return F.interpolate(masks.to(torch.uint8), size=size, mode="nearest").bool()


def jaccard_index(prediction: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Intersection over union of boolean masks, counting only ``valid`` pixels.

    Args:
        prediction: boolean ``(..., H, W)``.
        target: boolean, broadcastable to ``prediction``.
        valid: boolean, broadcastable; pixels where it is False count in neither the
            intersection nor the union (VOC's void). None: every pixel counts.

    Returns:
        float ``(...)``: the Jaccard index, NaN where the union is empty.
    """
    for name, mask in (("prediction", prediction), ("target", target), ("valid", valid)):
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"Expected {name} to be a boolean mask, but got dtype {mask.dtype}")
    intersection = prediction & target
    union = prediction | target
    if valid is not None:
        intersection, union = intersection & valid, union & valid
    inter = intersection.sum(dim=(-2, -1)).to(torch.float64)
    uni = union.sum(dim=(-2, -1)).to(torch.float64)
    return torch.where(uni > 0, inter / uni.clamp(min=1), torch.full_like(uni, math.nan))


def object_masks(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Split one image's mask into object masks and the pixels that count.

    Args:
        mask: ``(H, W)``: boolean (one object, e.g. cluttered-fashion) or an integer class map
            (e.g. VOC's SegmentationClass) with 0 = background and 255 = void.

    Returns:
        ``(objects, valid)``: boolean ``(K, H, W)``, one mask per object (per class present in a
        class map, in increasing class order; ``K = 0`` for an empty mask), and boolean
        ``(H, W)``, False on void pixels.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"Expected one (H, W) mask, but got {mask!r:.80}")
    if mask.dtype == torch.bool:
        objects = mask[None] if bool(mask.any()) else mask.new_zeros((0, *mask.shape))
        return objects, torch.ones_like(mask)
    if mask.dtype.is_floating_point:
        raise TypeError(f"Expected a boolean or integer mask, but got dtype {mask.dtype}")
    classes = [int(c) for c in mask.unique().tolist() if c not in (0, VOID)]
    objects = torch.stack([mask == c for c in classes]) if classes else None
    if objects is None:
        objects = torch.zeros((0, *mask.shape), dtype=torch.bool, device=mask.device)
    return objects, mask != VOID


def attention_jaccard(
    attention: Tensor, grid_shape: Sequence[int], masks: Tensor, *, mass: float = 0.6
) -> tuple[Tensor, Tensor]:
    """Jaccard of each image's attention against its objects, the DINO protocol.

    Each head's ``mass`` mask (see :func:`attention_masks`) is upsampled to the mask's pixels
    and compared with every object; each object takes its best head; the image's score is the
    mean over its objects.

    Args:
        attention: ``(B, heads, N)`` post-softmax [CLS] attention over the patches.
        grid_shape: ``(gh, gw)``.
        masks: ``(B, H, W)`` boolean object masks or integer class maps (see
            :func:`object_masks`).
        mass: share of the attention mass each head keeps.

    Returns:
        ``(scores, per_head)``: float64 ``(B,)`` image scores (NaN for an image without
        objects) and float64 ``(B, heads)``, each head's Jaccard averaged over the image's
        objects (NaN likewise).

    Example:
        >>> attention = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> mask[0, :2, :2] = True  # the top-left patch of a 2x2 grid of 2x2-pixel patches
        >>> attention_jaccard(attention, (2, 2), mask)[0].tolist()
        [1.0]
    """
    if masks.dim() != 3 or masks.shape[0] != attention.shape[0]:
        raise ValueError(
            f"Expected masks of shape (B, H, W) with B = {attention.shape[0]}, but got "
            f"shape {tuple(masks.shape)}"
        )
    predicted = attention_masks(attention, grid_shape, masks.shape[-2:], mass=mass)
    predicted = predicted.to(masks.device)
    scores = torch.full((masks.shape[0],), math.nan, dtype=torch.float64)
    per_head = torch.full(attention.shape[:2], math.nan, dtype=torch.float64)
    for b, mask in enumerate(masks):
        objects, valid = object_masks(mask)
        if objects.shape[0] == 0:
            continue
        # (objects, heads): every object against every head of this image.
        table = jaccard_index(predicted[b, None], objects[:, None], valid).cpu()
        scores[b] = table.max(dim=1).values.mean()
        per_head[b] = table.mean(dim=0)
    return scores, per_head


def map_statistics(logits: Tensor, grid_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Spatial entropy and number of regions of each attention map.

    The regions are the 8-connected components of the map's foreground (logits strictly above
    the map's mean), as in the loss; a constant map has no foreground and 0 regions.

    Args:
        logits: ``(B, heads, N)`` pre-softmax [CLS] logits over the patches.
        grid_shape: ``(gh, gw)``.

    Returns:
        ``(entropy, regions)``: float ``(B, heads)`` and int64 ``(B, heads)``.

    Example:
        >>> logits = torch.zeros(1, 1, 9)
        >>> logits[0, 0, [0, 8]] = 1.0  # two blobs in opposite corners of a 3x3 grid
        >>> [t.tolist() for t in map_statistics(logits, (3, 3))]
        [[[0.6931471824645996]], [[2]]]
    """
    gh, gw = check_maps(logits, grid_shape, "logits")
    logits = logits.detach()
    entropy = spatial_entropy(logits, (gh, gw))
    foreground, _ = foreground_weights(logits)  # the loss's rule: the counts are what it sees
    labels = label_components(foreground.reshape(*logits.shape[:2], gh, gw))
    return entropy, labels.flatten(-2).amax(dim=-1)


class AttentionStatistics:
    """Running attention statistics over batches: spatial entropy, regions, Jaccard.

    Call :meth:`update` after each forward pass (with the captured [CLS] logits, and with the
    post-softmax attention and masks when the data has object masks), then :meth:`compute`.
    Only sums are kept (on the device of the logits), so shards evaluated on several processes
    combine exactly: pass a cross-process sum to :meth:`compute` (as :func:`evaluate` does).

    Args:
        mass: share of the attention mass kept for the Jaccard.
        num_heads: maps per image; given, the sums exist before the first batch (a process
            with an empty shard can then join the sum), else they are sized by it.
        device: where the sums live when ``num_heads`` is given (default CPU).

    Example:
        >>> stats = AttentionStatistics()
        >>> logits = torch.zeros(2, 3, 9)
        >>> logits[..., 4] = 1.0  # one blob in the middle of every map
        >>> stats.update(logits, (3, 3))
        >>> stats.compute()["single_region_share"]
        1.0
    """

    # Layout of the sums: these scalars, then per head: entropy, regions, one-region maps and
    # the Jaccard of the images with objects.
    _SCALARS = ("images", "masked_images", "jaccard", "jaccard_images")

    def __init__(
        self,
        mass: float = 0.6,
        *,
        num_heads: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.mass = mass
        self.num_heads = num_heads
        self.device = device
        self.reset()

    def _zeros(self, heads: int, device: torch.device | str | None) -> Tensor:
        return torch.zeros(len(self._SCALARS) + 4 * heads, dtype=torch.float64, device=device)

    def update(
        self,
        logits: Tensor,
        grid_shape: Sequence[int],
        attention: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        """Add a batch: ``logits`` and ``attention`` ``(B, heads, N)``, ``masks`` ``(B, H, W)``."""
        entropy, regions = map_statistics(logits, grid_shape)
        batch, heads = entropy.shape
        if self._sums is None:
            self._sums = self._zeros(heads, entropy.device)
        expected = (self._sums.numel() - len(self._SCALARS)) // 4
        if heads != expected:
            raise ValueError(f"Expected {expected} heads, as in the earlier batches, got {heads}")
        scalars = [batch, 0, 0.0, 0]
        jaccard_per_head = torch.zeros(heads, dtype=torch.float64)
        if masks is not None:
            if attention is None:
                raise ValueError("the Jaccard needs the post-softmax attention with the masks")
            scores, per_head = attention_jaccard(attention, grid_shape, masks, mass=self.mass)
            scored = ~scores.isnan()
            scalars[1:] = [batch, scores[scored].sum().item(), int(scored.sum())]
            jaccard_per_head = per_head[scored].sum(dim=0)
        device = self._sums.device
        self._sums += torch.cat(
            [
                torch.tensor(scalars, dtype=torch.float64).to(device),
                entropy.sum(dim=0, dtype=torch.float64).to(device),
                regions.sum(dim=0, dtype=torch.float64).to(device),
                (regions == 1).sum(dim=0, dtype=torch.float64).to(device),
                jaccard_per_head.to(device),
            ]
        )

    def reset(self) -> None:
        """Forget every batch (e.g. at the start of an epoch)."""
        self._sums = None if self.num_heads is None else self._zeros(self.num_heads, self.device)

    def compute(
        self, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float | int | list[float]]:
        """Statistics of all batches since the last :meth:`reset`.

        Args:
            reduce: applied to the running sums (one float64 tensor) before the means are
                taken, e.g. ``spatial_entropy.distributed.all_reduce_sum`` to combine the
                shards of all processes; collective then, every process calls it.

        Returns:
            ``se_mean`` (mean spatial entropy over maps), ``se_per_head``, ``regions_mean``
            (mean number of regions per map), ``regions_per_head``, ``single_region_share``
            (share of maps with exactly one region), ``images`` (number of images); with masks
            also ``jaccard`` (mean over images with objects), ``jaccard_per_head`` and
            ``jaccard_images`` (number of images with objects).
        """
        sums = self._sums
        if sums is not None and reduce is not None:
            sums = reduce(sums)
        if sums is None or sums[0] == 0:
            raise RuntimeError("no batch was added; call update() first")
        sums = sums.cpu()
        scalars = dict(zip(self._SCALARS, sums[: len(self._SCALARS)].tolist(), strict=True))
        entropy, regions, single, jaccard = sums[len(self._SCALARS) :].view(4, -1)
        images = scalars["images"]
        maps = images * entropy.numel()
        result: dict[str, float | int | list[float]] = {
            "se_mean": entropy.sum().item() / maps,
            "se_per_head": (entropy / images).tolist(),
            "regions_mean": regions.sum().item() / maps,
            "regions_per_head": (regions / images).tolist(),
            "single_region_share": single.sum().item() / maps,
            "images": int(images),
        }
        if scalars["masked_images"]:
            scored = scalars["jaccard_images"]
            result["jaccard"] = scalars["jaccard"] / scored if scored else math.nan
            result["jaccard_per_head"] = (jaccard / scored).tolist()
            result["jaccard_images"] = int(scored)
        return result


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    *,
    accuracy: bool = True,
    attention: bool = False,
    mass: float = 0.6,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Accuracy and attention statistics of ``model`` on ``loader``, in one pass.

    Under torchrun each rank passes its shard (see ``loader.build_eval_loader``); the sums are
    reduced over ranks, so every rank returns the metrics of the whole set.

    Args:
        model: the classifier; put in eval mode for the loop and restored afterwards. With
            ``attention``, a timm ViT with a [CLS] token (see :class:`AttentionCapture`),
            whose hooks are removed afterwards.
        loader: yields ``(images, labels)`` or ``(images, labels, masks)``: images
            ``(B, C, H, W)``, labels ``(B,)`` class indices, masks ``(B, H, W)`` (bool, or
            class maps with 255 = void).
        device: where to run; default the model's device.
        amp_dtype: autocast dtype of the forward pass (None: full precision).
        accuracy: compute ``top1``, ``top5`` (percent), ``loss`` (mean cross-entropy) and
            ``images``.
        attention: compute the statistics of the last block's [CLS] attention (the keys of
            :meth:`AttentionStatistics.compute`; the Jaccard only when masks come).
        mass: share of the attention mass each head keeps for the Jaccard.
        max_batches: stop after this many batches.

    Returns:
        The metrics asked for; ``images`` counts the images evaluated.

    Raises:
        ValueError: nothing is asked for, or the loader yields no image.
    """
    if not (accuracy or attention):
        raise ValueError("Expected accuracy or attention (or both) to evaluate, got neither")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    capture = AttentionCapture(model) if attention else None
    statistics = None
    if capture is not None:
        # Sized up front so that a rank with an empty shard still joins the reduction.
        statistics = AttentionStatistics(mass, num_heads=capture.num_heads, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    was_training = model.training
    model.eval()
    try:
        for index, (images, targets, *masks) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
            if accuracy:
                sums += _accuracy_sums(output.float(), targets.to(device, non_blocking=True))
            if statistics is not None:
                # The post-softmax attention is only needed (and only computed) for the Jaccard.
                mask = masks[0] if masks else None
                post_softmax = None if mask is None else capture.attention
                statistics.update(capture.logits, capture.grid_shape, post_softmax, mask)
    finally:
        model.train(was_training)
        if capture is not None:
            capture.remove()
    metrics: dict[str, Any] = {}
    if accuracy:
        loss, top1, top5, count = all_reduce_sum(sums).tolist()
        if count == 0:
            raise ValueError("evaluation set is empty")
        metrics = {"top1": 100 * top1 / count, "top5": 100 * top5 / count,
                   "loss": loss / count, "images": int(count)}  # fmt: skip
    if statistics is not None:
        # Sums of every rank's shard, not a mean of the ranks' means (shards differ in size).
        metrics |= statistics.compute(reduce=all_reduce_sum)
    return metrics


def _accuracy_sums(output: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy, top-1 and top-5 hits and the image count of one batch, float64."""
    top1, top5 = topk_accuracy(output, targets, topk=(1, min(5, output.shape[-1])))
    batch = targets.shape[0]
    loss = F.cross_entropy(output, targets, reduction="sum")
    correct = torch.stack([top1, top5]).double() * batch / 100
    return torch.cat([loss.double()[None], correct, correct.new_tensor([batch])])


def evaluate_attention(
    model: nn.Module,
    loader: Iterable,
    *,
    mass: float = 0.6,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> dict[str, float | int | list[float]]:
    """The attention statistics alone (see :class:`AttentionStatistics` for the keys):
    :func:`evaluate` without the accuracy, so the labels may be anything."""
    return evaluate(
        model, loader, device, accuracy=False, attention=True, mass=mass, max_batches=max_batches
    )


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    *,
    attention: bool = False,
    mass: float = 0.6,
    dataset: str | None = None,
    data_path: str | os.PathLike | None = None,
    data_options: dict[str, Any] | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Evaluate a finished run's weights (or ``checkpoint``) on ``split`` of its dataset.

    The model and data come from ``RUN_DIR/config.yaml`` (see :func:`runs.load_run`);
    ``checkpoint`` is a ``.safetensors`` file or a training checkpoint
    (``checkpoints/step_*.pt``). ``split="train"`` is the run's training subset, without
    augmentation. Under torchrun each rank evaluates its shard and rank 0 writes
    ``RUN_DIR/eval.json`` (atomically, replacing an earlier one).

    Other data (``dataset``, ``data_path``, ``data_options``), e.g. a folder of the user's
    images with a ``masks/`` tree: accuracy only when the run has every class of that data
    (labels matched by class name); otherwise it is left out and ``omitted`` says why, as it
    does for a Jaccard asked for on data without object masks.

    Args:
        attention: also the attention statistics (see :func:`evaluate`), with the Jaccard
            when the data has object masks (cluttered-fashion, voc2012, pets, imagefolder
            with a masks folder).
        mass: share of the attention mass each head keeps for the Jaccard.
        dataset, data_path, data_options, skip_bad: the data to evaluate on, as in
            :func:`runs.load_run`.

    Returns:
        ``split``, ``checkpoint``, ``dataset``, ``data_path`` and ``images``; ``top1``,
        ``top5`` (percent) and ``loss`` when the labels are the run's classes; with
        ``attention`` the keys of :meth:`AttentionStatistics.compute` and ``mass``;
        ``omitted``: metric -> reason, for metrics that cannot be computed on this data.

    Raises:
        ValueError: nothing can be computed (other classes than the run's, no ``attention``).
    """
    paths = RunPaths(run_dir)
    model, data, cfg = load_run(
        run_dir, split, checkpoint=checkpoint, with_masks=attention, dataset=dataset,
        data_path=data_path, data_options=data_options, skip_bad=skip_bad,
    )  # fmt: skip
    name, where, _ = data_source(cfg, dataset, data_path)
    omitted = {}
    accuracy = labels_match_run(model, data)
    if not accuracy:
        omitted["accuracy"] = (
            f"{name} at {where} has classes the run lacks ({_names(data.classes)}; the run "
            f"has {_names(model.classes)}), so accuracy would mean nothing"
        )
        if not attention:
            raise ValueError(f"{omitted['accuracy']}; only --attention statistics can be computed")
    if attention and not data.with_masks:
        omitted["jaccard"] = f"{name} at {where} has no object masks" + (
            " (imagefolder: a masks/ folder beside train/ and val/, or the masks_path option)"
            if name == "imagefolder"
            else ""
        )
    info = init_distributed(device)
    try:
        loader = build_eval_loader(data, cfg.batch_size, info, num_workers=cfg.num_workers)
        measured = evaluate(model.to(info.device), loader, info.device, accuracy=accuracy,
                            attention=attention, mass=mass)  # fmt: skip
    finally:
        cleanup_distributed()
    weights = checkpoint if checkpoint is not None else paths.weights
    metrics = {key: measured[key] for key in ("top1", "top5", "loss", "images") if key in measured}
    metrics |= {"split": split, "checkpoint": str(weights), "dataset": name}
    metrics["data_path"] = None if where is None else str(where)
    if attention:
        metrics |= measured | {"mass": mass}
    if omitted:
        metrics["omitted"] = omitted
    if info.is_main:
        write_json(paths.eval, metrics)
    return metrics


def _names(classes: Sequence[str], shown: int = 4) -> str:
    """``classes`` for a message: the count and the first few names."""
    more = ", ..." if len(classes) > shown else ""
    return f"{len(classes)}: {', '.join(map(str, classes[:shown]))}{more}"
