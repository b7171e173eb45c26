"""Atomic training checkpoints that load without unpickling code."""

from __future__ import annotations

import io
import os
import pickle
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from spatial_entropy.files import atomic_write

__all__ = [
    "UnreadableFileError",
    "RankState",
    "TrainState",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoints_to_resume",
    "temporary_files",
    "read_file",
    "save_weights",
    "load_weights",
]

LATEST = "latest"
CHECKPOINT_FILES = rf"step_\d{{8}}\.(?:pt|safetensors)|{LATEST}"
"""The names of the files :func:`save_checkpoint` writes (a regular expression)."""


class UnreadableFileError(ValueError):
    """A weights or checkpoint file whose content cannot be read: truncated (a copy or a save
    cut short), corrupt, or holding objects that a safe load refuses."""


def read_file(path: str | os.PathLike, reader: Callable[[str], Any]) -> Any:
    """``reader(path)``, with any failure to parse the file raised as :class:`UnreadableFileError`
    naming it (the readers' own errors do not say which file they were reading).

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: as the reader raises them.
        UnreadableFileError: anything else the reader raised.
    """
    try:
        return reader(str(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise UnreadableFileError(f"cannot read {path}: {_read_failure(exc)}") from exc


def _read_failure(exc: BaseException) -> str:
    """Why a file did not load, in one line."""
    refused = exc if isinstance(exc, pickle.UnpicklingError) else exc.__cause__
    if isinstance(refused, pickle.UnpicklingError):  # timm wraps it in a RuntimeError
        # torch's message surrounds the reason with advice to load the file unsafely (which
        # would run its code): keep only the reason.
        detail = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(refused))
        reason = "it holds objects besides tensors and plain values, which a safe load refuses"
        return f"{reason} ({detail[1]})" if detail else reason
    # The first sentence: torch's next ones guess at causes, as "truncated or corrupt?" does.
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
    return f"truncated or corrupt? {first}"


def temporary_files(directory: str | os.PathLike, names: str) -> list[Path]:
    """The temporary files that :func:`atomic_write` left in ``directory`` (killed mid-write)
    for the files whose names match the regular expression ``names``; no other file matches.

    Example:
        >>> temporary_files("/nonexistent", r"log\\.csv")
        []
    """
    # mkstemp's name: prefix, 8 characters from [a-z0-9_], suffix.
    pattern = re.compile(rf"\.(?:{names})\.[a-z0-9_]{{8}}\.tmp")
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def _fields_of(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _from_fields(
    cls: type, values: Mapping[str, Any], retired: frozenset[str] = frozenset()
) -> Any:
    values = {k: v for k, v in values.items() if k not in retired}
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
    before it existed then load with the default. A field removed later goes to ``RETIRED``:
    checkpoints that hold it still load.
    """

    # The learning-rate schedule's state is a function of the config and the step (timm's
    # schedulers are stateless), rebuilt on resume: a resume with a longer ``epochs`` follows
    # the longer schedule instead of the saved one. Older checkpoints hold it.
    RETIRED: typing.ClassVar[frozenset[str]] = frozenset({"scheduler"})

    epoch: int = 0  # the epoch to continue
    batch: int = 0  # batches of ``epoch`` already done
    step: int = 0  # optimiser steps done
    elapsed: float = 0.0  # seconds of training so far, over all sessions
    best: dict[str, Any] = field(default_factory=dict)  # best validation top1, epoch, step
    global_batch: int = 0  # images per step over all processes
    optimizer: dict[str, Any] = field(default_factory=dict)
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
        return _from_fields(cls, {**state, "ranks": ranks}, cls.RETIRED)


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically."""
    atomic_write(path, save(_state_dict(model)))


def load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors state dict (safetensors never runs code).

    Raises:
        UnreadableFileError: the file is truncated or not safetensors; names the file.
    """
    return read_file(path, load_file)


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


def checkpoints_to_resume(directory: str | os.PathLike) -> list[Path]:
    """The checkpoints to try when resuming, best first: the one ``directory/latest`` names,
    then the older ones that are kept, newest first (stems; empty without ``latest``)."""
    latest = latest_checkpoint(directory)
    if latest is None:
        return []
    older = [
        p.with_suffix("")
        for p in Path(directory).glob("step_*.pt")
        if p.name < latest.with_suffix(".pt").name and p.with_suffix(".safetensors").is_file()
    ]
    return [latest, *sorted(older, reverse=True)]


def load_checkpoint(stem: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a checkpoint saved by :func:`save_checkpoint`: (model state dict, training state).

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain values, so a
    checkpoint from an untrusted source cannot execute code.

    Raises:
        UnreadableFileError: either file is truncated or corrupt; names the file.
    """
    stem = Path(stem)
    weights = load_weights(stem.with_suffix(".safetensors"))
    state = read_file(
        stem.with_suffix(".pt"), lambda p: torch.load(p, map_location="cpu", weights_only=True)
    )
    return weights, state
