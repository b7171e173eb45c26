"""Atomic training checkpoints that load without unpickling code."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from spatial_entropy.files import atomic_write

# Their home until issue 13: still importable from here.
from spatial_entropy.rng import get_rng_state, preserved_rng, seed_all, set_rng_state  # noqa: F401

__all__ = [
    "RankState",
    "TrainState",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "save_weights",
    "load_weights",
]

LATEST = "latest"


def _fields_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _from_fields(cls: type, values: Mapping[str, Any]) -> Any:
    unknown = sorted(values.keys() - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(
            f"Expected the keys of {cls.__name__} in a training checkpoint, but got unknown "
            f"keys {unknown} (written by a newer version?)"
        )
    return cls(**values)


@dataclass
class RankState:
    """What each process saves of its own: every rank draws its own random numbers (dropout,
    Mixup) and sums its own statistics of the current epoch."""

    rng: dict[str, Any]  # see rng.get_rng_state
    epoch_sums: dict[str, Tensor] = field(default_factory=dict)  # on the CPU
    # Each regulariser's Regularizer.state_dict() by name (DRLoc: its sampling stream).
    regularizers: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class TrainState:
    """Everything a training checkpoint holds besides the model's weights.

    A fresh run starts from ``TrainState()``. :meth:`to_dict` gives the plain dict that
    :func:`save_checkpoint` writes and :meth:`from_dict` reads it back, so a checkpoint holds
    only tensors and plain values. A field added later needs a default: checkpoints written
    before it existed then load with the default.
    """

    epoch: int = 0  # the epoch to continue
    batch: int = 0  # batches of ``epoch`` already done
    step: int = 0  # optimiser steps done
    elapsed: float = 0.0  # seconds of training so far, over all sessions
    best: dict[str, Any] = field(default_factory=dict)  # best validation top1, epoch, step
    global_batch: int = 0  # images per step over all processes
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] | None = None  # the EMA model's state dict, with model_ema
    ranks: list[RankState] = field(default_factory=list)  # indexed by rank
    # The state dicts of the regularisers' trainable modules by regulariser name (the DRLoc
    # head): training-only, so kept here and never in the model's safetensors.
    regularizer_modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and Python values, for :func:`save_checkpoint`."""
        return _fields_of(self) | {"ranks": [_fields_of(rank) for rank in self.ranks]}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TrainState:
        """The state that :meth:`to_dict` gave; raises ValueError on an unknown key."""
        ranks = [_from_fields(RankState, rank) for rank in state.get("ranks", [])]
        return _from_fields(cls, {**state, "ranks": ranks})


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically."""
    atomic_write(path, save(_state_dict(model)))


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors state dict (safetensors never runs code)."""
    return load_file(str(path))


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: Mapping[str, Any],
    keep: int = 2,
) -> Path:
    """Save ``model`` (safetensors) and ``state`` (``torch.save``) as checkpoint ``step``.

    Both files are written atomically, then the ``latest`` pointer is replaced, then all but the
    newest ``keep`` checkpoints are deleted: a kill at any moment leaves ``latest`` naming a
    complete checkpoint. ``state`` must hold only tensors and plain Python values.

    Returns:
        The checkpoint's path without suffix (``directory/step_00000100``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"step_{step:08d}"
    save_weights(model, stem.with_suffix(".safetensors"))
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write(stem.with_suffix(".pt"), buffer.getvalue())
    atomic_write(directory / LATEST, stem.name.encode())
    for old in sorted(directory.glob("step_*.pt"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return stem


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``directory/latest`` (path without suffix), or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    stem = Path(directory) / pointer.read_text().strip()
    if not stem.with_suffix(".pt").is_file() or not stem.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"{pointer} names {stem.name}, whose files are missing")
    return stem


def load_checkpoint(stem: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a checkpoint saved by :func:`save_checkpoint`: (model state dict, training state).

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain values, so a
    checkpoint from an untrusted source cannot execute code.
    """
    stem = Path(stem)
    weights = load_weights(stem.with_suffix(".safetensors"))
    state = torch.load(stem.with_suffix(".pt"), map_location="cpu", weights_only=True)
    return weights, state
