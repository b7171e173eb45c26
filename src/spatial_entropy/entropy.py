"""The spatial-entropy loss of attention maps, its slow reference, and the weight schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage
import torch
from torch import nn

from spatial_entropy.checks import check_maps
from spatial_entropy.choices import SCHEDULES
from spatial_entropy.components import _check_backend, _check_connectivity, _component_ids

__all__ = [
    "SCHEDULES",
    "SpatialEntropyLoss",
    "foreground_weights",
    "reference_spatial_entropy",
    "se_weight",
    "spatial_entropy",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision cannot hold the small mass ratios; float64 stays float64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _map_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean over the last dimension in ``scores.dtype``; where that overflows, accumulated in
    float64 instead.

    A float32 sum of logits near the float32 maximum overflows to inf and makes the map NaN,
    although the mean itself is representable. Only those maps take the float64 mean: every
    other map keeps the float32 mean bit for bit, in value and gradient, so training runs stay
    reproducible across versions. Both are computed (no data-dependent branch, no host
    synchronisation). (MPS has no float64; it keeps float32 there.)
    """
    mean = scores.mean(dim=-1, keepdim=True)
    if scores.device.type == "mps" or scores.dtype == torch.float64:
        return mean
    wide = scores.mean(dim=-1, keepdim=True, dtype=torch.float64).to(scores.dtype)
    return torch.where(torch.isfinite(mean), mean, wide)


def foreground_weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The foreground of each map and its weights: the one definition the loss and the
    evaluation's region counts share.

    For a map ``S`` (the last dimension): foreground ``S > mean(S)`` (strict; no gradient),
    weights ``relu(S - mean(S))`` (zero off the foreground; gradients flow through ``S`` and
    the mean). Computed in float32 for float16/bfloat16/float32 input, also under autocast,
    and in float64 for float64 input; a map whose float32 sum overflows takes its mean in
    float64 (see ``_map_mean``).

    Args:
        logits: ``(..., N)`` floating-point logits, one map per row.

    Returns:
        ``(foreground, weights)``: boolean ``(..., N)`` and ``(..., N)`` float32 (float64).

    Example:
        >>> foreground, weights = foreground_weights(torch.tensor([[0.0, 1.0, 2.0]]))
        >>> foreground.tolist(), weights.tolist()
        ([[False, False, True]], [[0.0, 0.0, 1.0]])
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = logits.to(_compute_dtype(logits.dtype))
        centred = scores - _map_mean(scores)
        foreground = (centred > 0).detach()
        return foreground, torch.where(foreground, centred, torch.zeros_like(centred))


def spatial_entropy(
    logits: torch.Tensor,
    grid_shape: Sequence[int],
    *,
    connectivity: int = 8,
    backend: str = "auto",
) -> torch.Tensor:
    """Spatial entropy of each attention map (Peruzzo et al., arXiv 2206.04636).

    For each map ``S`` (the [CLS] query's pre-softmax logits over the patch grid): the
    foreground is ``S > mean(S)``, its weights are ``relu(S - mean(S))``, the foreground is split
    into connected regions, and the result is the entropy of the weight mass over the regions,
    ``-sum_k P_k log P_k``. One region, or no foreground (a constant map), gives 0. Gradients
    flow through the weights and the mean; the foreground and the regions carry none.

    Computed in float32 for float16/bfloat16/float32 input, also under autocast (float64 input is
    computed and returned in float64, for gradcheck). A map holding a NaN or an infinite logit
    has value NaN: it is reported, not silently replaced (clean the logits upstream, e.g.
    ``torch.nan_to_num``, if that is wanted); the other maps are unaffected.

    Args:
        logits: ``(B, heads, N)`` floating-point logits with ``N = gh * gw``, patches in raster
            order (prefix tokens already removed).
        grid_shape: ``(gh, gw)``, the patch grid; need not be square.
        connectivity: 8 (the published choice) or 4.
        backend: labelling backend, see :func:`label_components`. ``"auto"`` labels CPU
            tensors with scipy (one C call for the whole batch, the fastest on a CPU) and
            other devices with ``"torch"``: for grids of up to 576 patches the transitive
            closure, so the loss issues no host synchronisation and a fixed sequence of
            kernels whatever the maps hold (capturable in a CUDA graph and by
            ``torch.compile(fullgraph=True)``); above 576 patches propagation, with one
            synchronisation. ``"torch"`` on a CPU tensor runs exactly the CUDA code (float32
            instead of float16 matmuls), which is how the tests pin the CUDA path.

    Returns:
        ``(B, heads)`` tensor of entropies (float32; float64 for float64 input).

    Raises:
        TypeError: if ``logits`` is not a floating-point tensor.
        ValueError: if the shapes disagree, or ``connectivity`` is not 4 or 8, or ``backend``
            is unknown.

    Example:
        >>> logits = torch.zeros(1, 1, 9)
        >>> logits[0, 0, [0, 8]] = 1.0  # two equal blobs in opposite corners of a 3x3 grid
        >>> round(spatial_entropy(logits, (3, 3)).item(), 4)  # log 2
        0.6931
    """
    gh, gw = check_maps(logits, grid_shape, non_empty=True)
    _check_connectivity(connectivity)
    _check_backend(backend)
    batch, heads, n = logits.shape
    with torch.autocast(device_type=logits.device.type, enabled=False):
        foreground, weights = foreground_weights(logits)
        ids, size = _component_ids(foreground.reshape(-1, gh, gw), connectivity, backend)
        ids = ids.reshape(-1)
        flat_weights = weights.reshape(-1)
        region_mass = flat_weights.new_zeros(size).scatter_add(0, ids, flat_weights)
        total = weights.sum(dim=-1, keepdim=True)
        safe_total = torch.where(total > 0, total, torch.ones_like(total))
        # With m_k the mass of region k and T the total, sum_k P_k log P_k equals
        # sum_j (A_j / T) log(m_{r(j)} / T) over foreground pixels j: each pixel reads its
        # region's mass (a gather, whose backward is one scatter_add; advanced indexing's
        # backward sorts the many duplicate ids, 6.6 of 8.6 ms on an H200).
        # Rounding can push a lone region's share a hair above 1; clamping keeps the value >= 0.
        share = (region_mass.gather(0, ids).reshape(batch, heads, n) / safe_total).clamp(max=1.0)
        usable = foreground & (share > 0)
        log_share = torch.log(torch.where(usable, share, torch.ones_like(share)))
        entropy = -((weights / safe_total) * log_share).sum(dim=-1)
        finite = torch.isfinite(logits).all(dim=-1)
        return torch.where(finite, entropy, torch.full_like(entropy, math.nan))


def reference_spatial_entropy(
    logits: torch.Tensor, grid_shape: Sequence[int], *, connectivity: int = 8
) -> torch.Tensor:
    """Slow, obviously correct spatial entropy: a Python loop over maps, one mask per region.

    This is how the authors' code computes the loss (one labelling call per map on the CPU).
    Kept as the test oracle and the benchmark baseline. Same arguments and output as
    :func:`spatial_entropy`; differentiable.
    """
    gh, gw = check_maps(logits, grid_shape, non_empty=True)
    _check_connectivity(connectivity)
    structure = scipy.ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = logits.to(_compute_dtype(logits.dtype))
        rows = []
        for b in range(scores.shape[0]):
            row = []
            for h in range(scores.shape[1]):
                grid = scores[b, h].reshape(gh, gw)
                mean = grid.mean(dtype=torch.float64).to(grid.dtype)  # no float32 overflow
                foreground = grid > mean
                weights = torch.relu(grid - mean) * foreground
                regions, count = scipy.ndimage.label(
                    foreground.detach().cpu().numpy(), structure=structure
                )
                if not torch.isfinite(grid).all():
                    row.append(grid.new_tensor(math.nan))
                    continue
                total = weights.sum()
                value = grid.new_zeros(())
                for k in range(1, count + 1):
                    region = torch.from_numpy(np.asarray(regions == k)).to(grid.device)
                    p = weights[region].sum() / total
                    if p > 0:
                        value = value - p * torch.log(p)
                row.append(value)
            rows.append(torch.stack(row))
        return torch.stack(rows)


class SpatialEntropyLoss(nn.Module):
    """Mean spatial entropy over a batch of maps; see :func:`spatial_entropy`.

    Call as ``loss(logits, grid_shape)`` with logits ``(B, heads, N)``; returns a scalar.

    Example:
        >>> loss = SpatialEntropyLoss()
        >>> loss(torch.randn(2, 3, 16), (4, 4)).shape
        torch.Size([])
    """

    def __init__(self, connectivity: int = 8, backend: str = "auto") -> None:
        super().__init__()
        _check_connectivity(connectivity)
        _check_backend(backend)
        self.connectivity = connectivity
        self.backend = backend

    def forward(self, logits: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
        values = spatial_entropy(
            logits, grid_shape, connectivity=self.connectivity, backend=self.backend
        )
        return values.mean()

    def extra_repr(self) -> str:
        return f"connectivity={self.connectivity}, backend={self.backend!r}"


def se_weight(
    t: float,
    total: float,
    *,
    weight: float,
    schedule: str = "warmup_cosine",
    warmup: float = 10.0,
) -> float:
    """The weight λ(t) of the spatial-entropy term at time ``t`` of a run of length ``total``.

    ``t``, ``total`` and ``warmup`` share one unit: epochs for per-epoch updates, or fractional
    epochs (``epoch + step / steps_per_epoch``) for per-step updates.

    - ``"constant"``: ``weight`` throughout.
    - ``"warmup_cosine"`` (published: λ = 0.01, 10 warm-up epochs): linear from 0 at ``t = 0``
      to ``weight`` at ``t = warmup``, then cosine decay to 0 at ``t = total``. A run shorter
      than twice the warm-up gets a warm-up of ``total / 2``, so the weight still peaks.

    Example:
        >>> se_weight(0, 100, weight=0.01), se_weight(10, 100, weight=0.01)
        (0.0, 0.01)
        >>> se_weight(100, 100, weight=0.01)
        0.0
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Expected schedule in {SCHEDULES}, but got {schedule!r}")
    if total <= 0:
        raise ValueError(f"Expected a positive run length, but got total={total}")
    if warmup < 0:
        raise ValueError(f"Expected a non-negative warm-up, but got warmup={warmup}")
    if schedule == "constant":
        return float(weight)
    t = min(max(float(t), 0.0), float(total))
    warmup = min(float(warmup), total / 2)
    if t < warmup:
        return weight * t / warmup
    progress = (t - warmup) / (total - warmup)
    return weight * 0.5 * (1.0 + math.cos(math.pi * progress))
