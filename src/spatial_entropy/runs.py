"""The run directory: the names of the files a run holds, and loading a trained run back."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from spatial_entropy.checkpoint import (
    CHECKPOINT_FILES,
    UnreadableFileError,
    atomic_write,
    temporary_files,
)
from spatial_entropy.config import TrainConfig, load_config
from spatial_entropy.data import build_dataset
from spatial_entropy.data.registry import dataset_class

# models.py reads a directory's weights by this name (load_checkpoint_into(model, run_dir)),
# and this module builds models, so the name is defined there.
from spatial_entropy.models import MODEL_WEIGHTS_NAME, create_model, load_checkpoint_into

__all__ = ["RunPaths", "load_run", "to_json", "write_json"]


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each of its files; ``spatial-entropy train --output`` names ``root``.

    Example:
        >>> RunPaths("runs/demo").weights.as_posix()
        'runs/demo/model.safetensors'
    """

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        """The run's config (``TrainConfig``), written before training starts."""
        return self.root / "config.yaml"

    @property
    def weights(self) -> Path:
        """The trained model's weights, written when training ends."""
        return self.root / MODEL_WEIGHTS_NAME

    @property
    def ema_weights(self) -> Path:
        """The EMA model's weights (runs with ``model_ema``), written when training ends."""
        return self.root / "model_ema.safetensors"

    @property
    def log(self) -> Path:
        """One row per epoch: training statistics and validation metrics."""
        return self.root / "log.csv"

    @property
    def tensorboard(self) -> Path:
        """The TensorBoard event files (when TensorBoard is installed)."""
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        """The final metrics of training (``train`` returns the same dict)."""
        return self.root / "metrics.json"

    @property
    def eval(self) -> Path:
        """The metrics of the last ``spatial-entropy evaluate``."""
        return self.root / "eval.json"

    @property
    def checkpoints(self) -> Path:
        """The training checkpoints (see ``checkpoint.save_checkpoint``)."""
        return self.root / "checkpoints"

    def run_files(self) -> list[Path]:
        """The files and folders of a run that exist in ``root``: a non-empty list means that
        ``root`` holds a run (or the start of one). Other files in ``root`` are not the run's."""
        named = [self.config, self.weights, self.ema_weights, self.log, self.metrics, self.eval]
        named += [self.tensorboard, self.checkpoints]
        return [path for path in named if path.exists()]

    def remove_run(self) -> None:
        """Delete the run's files (:meth:`run_files` and stale temporary files); other files
        in ``root`` stay."""
        for path in [*self.stale_temporaries(), *self.run_files()]:  # files in folders first
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def stale_temporaries(self) -> list[Path]:
        """Temporary files that a save killed mid-write left (only the names that training
        and evaluation write atomically; see ``checkpoint.temporary_files``)."""
        own = [self.weights, self.ema_weights, self.log, self.metrics, self.eval]
        names = "|".join(re.escape(path.name) for path in own)
        return temporary_files(self.root, names) + temporary_files(
            self.checkpoints, CHECKPOINT_FILES
        )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """``data`` as indented, standard JSON: a non-finite float (NaN, inf, which JSON has no
    words for) becomes null.

    Example:
        >>> to_json({"loss": float("nan"), "top1": 50.0})
        '{\\n  "loss": null,\\n  "top1": 50.0\\n}'
    """
    return json.dumps(_finite_or_none(data), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write :func:`to_json` of ``data`` to ``path`` atomically (metrics and evaluations)."""
    atomic_write(path, to_json(data).encode())


def load_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    *,
    checkpoint: str | os.PathLike | None = None,
    with_masks: bool = True,
) -> tuple[nn.Module, Dataset, TrainConfig]:
    """A trained run's model and a split of its dataset, as ``RUN_DIR/config.yaml`` describes.

    Args:
        run_dir: a directory written by ``spatial-entropy train``.
        split: the dataset split to build, with the evaluation transform.
        checkpoint: weights to load instead of ``RUN_DIR/model.safetensors``: a
            ``.safetensors`` file, a training checkpoint (``checkpoints/step_*``, with or
            without suffix) or a checkpoint directory (its latest checkpoint).
        with_masks: give the items object masks when the dataset has them.

    Returns:
        ``(model, dataset, config)``, the model in eval mode on the CPU.

    Raises:
        FileNotFoundError: the run has no weights (yet) or ``checkpoint`` does not exist.
        UnreadableFileError: the weights file is truncated or corrupt (a ValueError).
        ValueError: the weights do not fit the model exactly, e.g. a classifier for another
            number of classes than the split has (nothing is adapted or re-initialised).
    """
    paths = RunPaths(run_dir)
    config = load_config(paths.config)
    weights = Path(checkpoint) if checkpoint is not None else paths.weights
    if weights.suffix == ".pt":  # a training checkpoint's state; its weights sit beside it
        weights = weights.with_suffix(".safetensors")
    if checkpoint is None and not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}; has the run finished?")
    masks = with_masks and dataset_class(config.dataset).mask_dtype is not None
    dataset = build_dataset(
        config.dataset,
        split,
        data_path=config.data_path,
        img_size=config.image_size(),
        is_train=False,
        seed=config.seed,
        with_masks=masks,
        options=config.data_options or None,
    )
    model = create_model(
        config.model,
        num_classes=dataset.num_classes,
        img_size=config.image_size(),
        in_chans=dataset.in_chans,
        no_last_skip=config.no_last_skip,
        **config.model_kwargs,
    )
    try:
        # Strict: a run's own weights fit exactly; a new head would evaluate random weights.
        load_checkpoint_into(model, weights, strict=True)
    except UnreadableFileError:
        raise  # names the file already; it is not a question of fitting
    except ValueError as exc:
        raise ValueError(
            f"{weights} does not fit the model that {paths.config} describes for "
            f"split {split!r} ({dataset.num_classes} classes, {dataset.in_chans} input "
            f"channels): {exc}"
        ) from exc
    return model.eval(), dataset, config
