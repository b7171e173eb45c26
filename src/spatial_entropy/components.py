"""Batched connected-component labelling of boolean grids, exact on CPU and CUDA."""

from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

__all__ = ["CLOSURE_MAX_PATCHES", "label_components", "reference_label_components"]

BACKENDS = ("auto", "scipy", "torch", "closure", "propagate")

# Above this many patches per map (24x24, the grid of a patch-16 ViT at 384 px) the "torch"
# backend labels by propagation instead of the closure: the closure holds (maps, N, N) matrices,
# 0.5 GB in half precision for 768 maps of 24x24, and its cost grows as N**3 per map.
CLOSURE_MAX_PATCHES = 576


def _check_connectivity(connectivity: int) -> None:
    """Raise ``ValueError`` unless ``connectivity`` is 4 or 8 (the one check every entry uses)."""
    if isinstance(connectivity, bool) or connectivity not in (4, 8):
        raise ValueError(f"Expected connectivity 4 or 8, but got {connectivity!r}")


def _check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"Expected backend in {BACKENDS}, but got {backend!r}")


def _check_mask(mask: torch.Tensor, connectivity: int) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Expected mask to be a torch.Tensor, but got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"Expected a boolean mask, but got dtype {mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(
            f"Expected mask of shape (..., H, W) with rank >= 2, but got rank {mask.dim()}"
        )
    _check_connectivity(connectivity)


def _structure(connectivity: int) -> np.ndarray:
    return scipy.ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)


def reference_label_components(mask: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """Slow, obviously correct labelling: one ``scipy.ndimage.label`` call per map.

    Args:
        mask: boolean tensor ``(..., H, W)``.
        connectivity: 8 (default) or 4.

    Returns:
        int64 tensor of the same shape: 0 is background, each map's components are numbered
        1..K in raster order of their first pixel (scipy's numbering).
    """
    _check_mask(mask, connectivity)
    maps = mask.detach().cpu().numpy().reshape(-1, *mask.shape[-2:])
    out = np.zeros(maps.shape, dtype=np.int64)
    for i, grid in enumerate(maps):
        out[i] = scipy.ndimage.label(grid, structure=_structure(connectivity))[0]
    return torch.from_numpy(out).reshape(mask.shape).to(mask.device)


def _label_scipy(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, int]:
    """Labels ``(M, H, W)`` maps with a single scipy call; ids are unique across all maps."""
    # A 3-D structure whose only non-zero plane is the middle one connects pixels within a map
    # and never across maps, so the whole batch is labelled by one pass of the C labeller.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = _structure(connectivity)
    ids, count = scipy.ndimage.label(maps.detach().cpu().numpy(), structure=structure)
    return torch.from_numpy(ids.astype(np.int64, copy=False)), int(count)


def _min_neighbour(labels: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Minimum of each pixel's label over itself and its neighbours, ``(M, H, W)`` float."""
    neg = -labels.unsqueeze(1)
    if connectivity == 8:
        pooled = F.max_pool2d(neg, 3, stride=1, padding=1)
    else:
        vertical = F.max_pool2d(neg, (3, 1), stride=1, padding=(1, 0))
        horizontal = F.max_pool2d(neg, (1, 3), stride=1, padding=(0, 1))
        pooled = torch.maximum(vertical, horizontal)
    return -pooled.squeeze(1)


def _label_propagate(
    maps: torch.Tensor, connectivity: int, initial_rounds: int | None = None
) -> torch.Tensor:
    """Labels ``(M, H, W)`` maps with tensor operations only; one host synchronisation.

    Every foreground pixel starts with its own flat index; each round takes the minimum over the
    neighbourhood and then follows labels as pointers (``label = label[label]``), so the label of
    a pixel is always the index of some pixel of its own component and only decreases. A
    component is settled once every pixel holds its minimum index. Pointer jumping settles
    compact blobs in a few rounds; an adversarial snake can need one round per pixel of its
    path. So after a fixed number of rounds we check convergence once, and if some map is not
    settled we run the number of further rounds that is provably enough (the largest foreground
    count of any map bounds every path length). Returns the flat index of each component's
    first pixel (raster order) for foreground pixels and ``M*H*W`` for background.
    ``initial_rounds`` (default ``H + W``) is the number of rounds before the check.
    """
    m, h, w = maps.shape
    total = m * h * w
    # Labels travel through max_pool2d, which needs floating point: float32 is exact up to 2**24.
    dtype = torch.float32 if total < 2**24 else torch.float64
    # a fill on the device, not torch.tensor(scalar, device=...): that copies from the host and
    # synchronises (seen with torch.cuda.set_sync_debug_mode on an H200)
    background = torch.full((), total, dtype=dtype, device=maps.device)
    index = torch.arange(total, device=maps.device, dtype=dtype).reshape(m, h, w)
    labels = torch.where(maps, index, background)

    def rounds(labels: torch.Tensor, count: int) -> torch.Tensor:
        for _ in range(count):
            labels = torch.where(maps, _min_neighbour(labels, connectivity), background)
            flat = torch.cat([labels.reshape(-1), background.reshape(1)])
            labels = flat[labels.long()]
        return labels

    first = h + w if initial_rounds is None else initial_rounds
    labels = rounds(labels, first)
    settled = torch.where(maps, _min_neighbour(labels, connectivity), background) == labels
    unsettled, longest = torch.stack(
        [(~settled).any().to(torch.int64), maps.reshape(m, -1).sum(1).max()]
    ).tolist()  # the single host synchronisation
    if unsettled:
        labels = rounds(labels, max(longest - first, 1))
    return labels.long()


def _neighbours(h: int, w: int, connectivity: int, device: torch.device) -> torch.Tensor:
    """``(H*W, H*W)`` boolean adjacency of the grid's pixels in raster order, self included."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    dr = (rows.view(-1, 1) - rows.view(1, -1)).abs()
    dc = (cols.view(-1, 1) - cols.view(1, -1)).abs()
    if connectivity == 8:
        return (dr <= 1) & (dc <= 1)
    return dr + dc <= 1


def _label_closure(
    maps: torch.Tensor, connectivity: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Labels ``(M, H, W)`` maps by transitive closure over row runs: no host synchronisation,
    fixed op count.

    A row run is a maximal horizontal segment of foreground; pixels of a run are connected, and
    two runs touch only across adjacent rows. Each map has at most ``K = H * ceil(W / 2)`` run
    slots (slot = row * ceil(W / 2) + the run's number within its row, so slots follow the raster
    order of the runs' first pixels). The runs' adjacency (self included) is a ``(M, K, K)`` 0/1
    matrix ``R``; after ``k`` squarings (clamped to 1) ``R[a, b] = 1`` exactly when a path of at
    most ``2**k`` run steps joins ``a`` and ``b``, and ``ceil(log2(K - 1))`` squarings give
    reachability for every mask (a shortest path never repeats a run), snakes and spirals
    included. A run's root is its component's first reachable slot, whose first pixel is the
    component's first pixel in raster order (its top row's leftmost pixel starts a run). Against
    the closure over pixels (`_label_closure_pixels`) the matrices are about 4x smaller per
    side: about 8x fewer operations for 14x14 and 24x24 grids.

    Only whether an entry is positive matters, so half precision is exact: a sum of non-negative
    integers never rounds to 0 (nor does an overflow to inf), whatever the accumulation precision.
    CUDA multiplies in float16 (tensor cores), on matrices padded to a multiple of 8 (aligned
    kernels); the CPU in float32, where float16 matmuls are slow. ``dtype`` overrides that
    choice (the tests run the float16 path on a CPU).

    Returns the same as :func:`_label_propagate`: for foreground pixels the flat index (over the
    whole batch) of their component's first pixel in raster order, ``M*H*W`` for background.
    """
    m, h, w = maps.shape
    n = h * w
    device = maps.device
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    per_row = (w + 1) // 2  # the most runs a row of width w can hold
    slots = h * per_row
    padded = -(-slots // 8) * 8  # a padded slot holds no run: never reachable
    dummy = padded * padded  # where the index of a non-existent pair points (dropped)
    starts = maps & ~F.pad(maps[:, :, :-1], (1, 0))  # foreground whose left is background
    within_row = starts.to(torch.int64).cumsum(dim=2) - 1
    run = torch.arange(h, device=device).view(1, h, 1) * per_row + within_row
    run = torch.where(maps, run, torch.zeros_like(run))  # (M, H, W), valid on the foreground
    # pairs (a, b) of runs that touch: each run with itself, and across each pair of rows
    pairs = [torch.where(maps, run * padded + run, dummy).reshape(m, -1)]
    below_run, below_maps = F.pad(run[:, 1:], (1, 1)), F.pad(maps[:, 1:], (1, 1))
    a = run[:, :-1]  # each pixel of rows 0..H-2 and its neighbour below, left or right
    for shift in (-1, 0, 1) if connectivity == 8 else (0,):
        b = below_run[:, :, 1 + shift : 1 + shift + w]
        touch = maps[:, :-1] & below_maps[:, :, 1 + shift : 1 + shift + w]
        pairs.append(torch.where(touch, a * padded + b, dummy).reshape(m, -1))
        pairs.append(torch.where(touch, b * padded + a, dummy).reshape(m, -1))
    index = torch.cat(pairs, dim=1)
    reach = torch.zeros(m, dummy + 1, dtype=dtype, device=device).scatter_(1, index, 1.0)
    reach = reach[:, :dummy].reshape(m, padded, padded)
    for _ in range(max(slots - 2, 0).bit_length()):  # ceil(log2(K - 1)) squarings, 0 for K <= 2
        reach = torch.bmm(reach, reach).clamp_(max=1)
    root_run = reach.argmax(dim=2)  # (M, padded): each run's component's first run
    # the flat index of each run's first pixel (a run slot gets exactly one start pixel)
    pixel = torch.arange(n, device=device).expand(m, n)
    first_pixel = torch.zeros(m, padded + 1, dtype=torch.int64, device=device).scatter_(
        1, torch.where(starts, run, padded).reshape(m, n), pixel
    )
    flat = maps.reshape(m, n)
    root = first_pixel.gather(1, root_run.gather(1, run.reshape(m, n)))
    offset = torch.arange(m, device=device).view(-1, 1) * n
    background = torch.full((), m * n, dtype=torch.int64, device=device)
    return torch.where(flat, root + offset, background).reshape(m, h, w)


def _label_closure_pixels(
    maps: torch.Tensor, connectivity: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Labels ``(M, H, W)`` maps by transitive closure over pixels (the plain form of
    `_label_closure`, which closes over row runs instead; kept as its test oracle and
    benchmark baseline): no host synchronisation, fixed op count.

    The foreground's adjacency (self included) is a ``(M, N, N)`` 0/1 matrix ``R``; after ``k``
    squarings (clamped to 1) ``R[i, j] = 1`` exactly when a path of at most ``2**k`` steps joins
    ``i`` and ``j``. A shortest path within a component never repeats a pixel, so it has at most
    ``N - 1`` steps and ``ceil(log2(N - 1))`` squarings give reachability for every mask, long
    snakes and spirals included, with no data-dependent control flow. A pixel's root is then its
    component's first reachable pixel (``argmax`` returns the first maximum).

    Only whether an entry is positive matters, so half precision is exact: a sum of non-negative
    integers never rounds to 0 (nor does an overflow to inf), whatever the accumulation precision.
    CUDA multiplies in float16 (tensor cores); the CPU in float32, where float16 matmuls are slow.
    ``dtype`` overrides that choice (the tests run the float16 path on a CPU).

    Returns the same as :func:`_label_propagate`: for foreground pixels the flat index (over the
    whole batch) of their component's first pixel in raster order, ``M*H*W`` for background.
    """
    m, h, w = maps.shape
    n = h * w
    if dtype is None:
        dtype = torch.float16 if maps.device.type == "cuda" else torch.float32
    flat = maps.reshape(m, n)
    # The matrices are padded to a multiple of 8 pixels, which half-precision tensor-core
    # matmuls need for their aligned kernels (196 -> 200 at 14x14). Padded pixels are
    # background: no edge, never reachable, so every label is unchanged.
    padded = -(-n // 8) * 8
    foreground = F.pad(flat.to(dtype), (0, padded - n))
    adjacency = F.pad(_neighbours(h, w, connectivity, maps.device).to(dtype),
                      (0, padded - n, 0, padded - n))  # fmt: skip
    reach = adjacency * foreground.unsqueeze(2) * foreground.unsqueeze(1)
    for _ in range(max(n - 2, 0).bit_length()):  # ceil(log2(N - 1)) squarings, 0 for N <= 2
        reach = torch.bmm(reach, reach).clamp_(max=1)
    first = reach[:, :n, :].argmax(dim=2)  # a padded column is 0 everywhere: never the first
    offset = torch.arange(m, device=maps.device).view(-1, 1) * n
    background = torch.full((), m * n, dtype=torch.int64, device=maps.device)
    return torch.where(flat, first + offset, background).reshape(m, h, w)


def _resolve_backend(backend: str, device: torch.device, patches: int) -> str:
    """The labeller that runs: ``"scipy"``, ``"closure"`` or ``"propagate"``."""
    _check_backend(backend)
    if backend == "auto":
        backend = "scipy" if device.type == "cpu" else "torch"
    if backend == "torch":
        return "closure" if patches <= CLOSURE_MAX_PATCHES else "propagate"
    return backend


def _label_tensor(maps: torch.Tensor, connectivity: int, labeller: str) -> torch.Tensor:
    """Roots of ``(M, H, W)`` maps by the tensor labeller ``"closure"`` or ``"propagate"``."""
    if labeller == "closure":
        return _label_closure(maps, connectivity)
    return _label_propagate(maps, connectivity)


def _component_ids(
    maps: torch.Tensor, connectivity: int = 8, backend: str = "auto"
) -> tuple[torch.Tensor, int]:
    """Component ids of ``(M, H, W)`` maps, unique across the whole batch, 0 for background.

    Returns ``(ids, size)`` with ``ids`` int64 on ``maps.device`` and every id ``< size``, so a
    ``scatter_add`` into a vector of ``size`` entries sums per component. On CPU the ids are
    consecutive; on CUDA they are the first pixel's flat index + 1 (no relabelling needed, so no
    extra synchronisation).
    """
    labeller = _resolve_backend(backend, maps.device, maps.shape[-2] * maps.shape[-1])
    if labeller == "scipy":
        ids, count = _label_scipy(maps, connectivity)
        return ids.to(maps.device), count + 1
    roots = _label_tensor(maps, connectivity, labeller)
    size = maps.numel() + 1
    return (roots + 1) % size, size


def label_components(
    mask: torch.Tensor, connectivity: int = 8, *, backend: str = "auto"
) -> torch.Tensor:
    """Label the connected components of every boolean grid in a batch.

    Exact for every mask (long snakes and spirals included): the partition equals that of
    ``scipy.ndimage.label`` with the matching structure. On CPU all maps are labelled by one call
    of scipy's C labeller; on CUDA by PyTorch operations only, with no copy of the mask to the
    host: for grids of up to :data:`CLOSURE_MAX_PATCHES` (576) pixels by transitive closure
    over the row runs (batched matrix squarings: no host synchronisation, a fixed number of
    kernel launches, so capturable in a CUDA graph and by ``torch.compile(fullgraph=True)``),
    for larger grids by min-label propagation with one host synchronisation (the closure's
    ``(maps, K, K)`` memory, ``K = H * ceil(W / 2)``, and ``K**3`` work grow too fast there).

    Args:
        mask: boolean tensor ``(..., H, W)``; all leading dimensions are batch dimensions.
        connectivity: 8 (default; diagonal neighbours connect) or 4.
        backend: ``"auto"`` (scipy for CPU tensors, ``"torch"`` otherwise), ``"scipy"`` (copies
            the mask to the host), ``"torch"`` (tensor operations on any device: the closure up
            to 576 pixels per map, propagation above), or one tensor labeller forced on any
            grid: ``"closure"`` (no synchronisation; memory ``O(maps * (H*W)**2 / 4)``) or
            ``"propagate"`` (one synchronisation; memory ``O(maps * H*W)``).

    Returns:
        int64 tensor with the shape of ``mask``: 0 is background and the components of each map
        are numbered 1..K in raster order of their first pixel (as scipy numbers them).

    Example:
        >>> mask = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
        >>> label_components(mask).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
        >>> label_components(mask, connectivity=4).tolist()
        [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
    """
    _check_mask(mask, connectivity)
    h, w = mask.shape[-2:]
    labeller = _resolve_backend(backend, mask.device, h * w)
    if mask.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    maps = mask.reshape(-1, h, w)
    if labeller == "scipy":
        ids, _ = _label_scipy(maps, connectivity)
        # scipy numbers components over the whole stack in raster order, so each map holds a
        # consecutive block of ids; subtract the number of components in the maps before it.
        per_map_max = ids.reshape(maps.shape[0], -1).amax(1)
        offset = torch.cat([per_map_max.new_zeros(1), torch.cummax(per_map_max, 0).values[:-1]])
        labels = torch.where(ids > 0, ids - offset.view(-1, 1, 1), 0)
        return labels.reshape(mask.shape).to(mask.device)
    roots = _label_tensor(maps, connectivity, labeller).reshape(maps.shape[0], -1)
    index = torch.arange(h * w, device=mask.device)
    flat = maps.reshape(maps.shape[0], -1)
    # A component's root is its first pixel; its rank among the roots of its map is its label.
    is_root = flat & (roots % (h * w) == index)
    rank = torch.cumsum(is_root.long(), dim=1).reshape(-1)
    labels = torch.where(flat, rank[roots.clamp(max=rank.numel() - 1)], 0)
    return labels.reshape(mask.shape)
