"""Input checks shared by the losses and the evaluation: patch grids and per-map tensors.

One definition of each rule, so that every entry point accepts the same inputs and names the
same problem in the same words (kornia keeps one shape checker for the same reason).
Imports nothing but torch: the math modules may use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = ["check_grid_shape", "check_maps"]


def check_grid_shape(grid_shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(gh, gw)`` as Python ints, or raise if ``grid_shape`` is not two positive ints.

    Args:
        grid_shape: the patch grid ``(gh, gw)``; a tuple, list or ``torch.Size`` of integers
            (numpy integers too).

    Raises:
        ValueError: if it is not a pair of positive integers (``True``/``False`` included).

    Example:
        >>> check_grid_shape([14, 10])
        (14, 10)
    """
    if (
        not isinstance(grid_shape, Sequence)
        or len(grid_shape) != 2
        or not all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) and g > 0
            for g in grid_shape
        )
    ):
        raise ValueError(
            f"Expected grid_shape to be two positive ints (gh, gw), got {grid_shape!r}"
        )
    return int(grid_shape[0]), int(grid_shape[1])


def check_maps(
    maps: torch.Tensor,
    grid_shape: Sequence[int],
    name: str = "logits",
    *,
    non_empty: bool = False,
) -> tuple[int, int]:
    """Check a batch of per-head maps over a patch grid; return the grid ``(gh, gw)``.

    Args:
        maps: ``(B, heads, N)`` floating-point tensor with ``N = gh * gw`` (raster order).
        grid_shape: ``(gh, gw)``, see :func:`check_grid_shape`.
        name: what ``maps`` is called in the error messages.
        non_empty: also require ``B > 0`` and ``heads > 0``.

    Raises:
        TypeError: if ``maps`` is not a floating-point tensor.
        ValueError: if it is not rank 3, the grid is malformed or does not match ``N``, or
            (with ``non_empty``) it holds no map.

    Example:
        >>> check_maps(torch.zeros(2, 3, 12), (3, 4))
        (3, 4)
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"Expected {name} to be a torch.Tensor, but got {type(maps).__name__}")
    if not maps.dtype.is_floating_point:
        raise TypeError(f"Expected floating-point {name}, but got dtype {maps.dtype}")
    if maps.dim() != 3:
        raise ValueError(
            f"Expected {name} of shape (B, heads, N), rank 3, but got shape {tuple(maps.shape)}"
        )
    gh, gw = check_grid_shape(grid_shape)
    if maps.shape[-1] != gh * gw:
        raise ValueError(
            f"Expected N = gh * gw = {gh * gw} entries of {name} per map ({gh}x{gw} grid), "
            f"but got N = {maps.shape[-1]} (shape {tuple(maps.shape)})"
        )
    if non_empty and (maps.shape[0] == 0 or maps.shape[1] == 0):
        raise ValueError(f"Expected a non-empty batch of maps, but got shape {tuple(maps.shape)}")
    return gh, gw
