"""Random number generator states: capture and restore them, seed them, keep them unchanged.

Exact resume needs every generator a run draws from (Python, NumPy's legacy global one that
timm's augmentations use, torch's CPU and CUDA ones) saved and put back; the data loader
seeds them per sample and must leave the caller's states as they were.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_state", "preserved_rng", "seed_all", "set_rng_state"]


def get_rng_state(cuda: bool = True) -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain lists.

    The result holds no arbitrary objects, so it survives ``torch.load(weights_only=True)``.
    """
    version, mt_state, gauss = random.getstate()
    # The legacy global NumPy RNG is the one that timm's Mixup and augmentations draw from.
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if cuda and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed the Python, NumPy and torch CPU generators (the ones data augmentation draws from)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002
    # Not torch.manual_seed: it also seeds every accelerator backend, ~100x slower per call.
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng(enabled: bool = True) -> Iterator[None]:
    """Put the Python, NumPy and torch CPU RNG states back as they were after the block."""
    if not enabled:
        yield
        return
    outer = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    try:
        yield
    finally:
        random.setstate(outer[0])
        np.random.set_state(outer[1])  # noqa: NPY002
        torch.set_rng_state(outer[2])
