"""The run directory: the names of the files a run holds, and loading a trained run back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; training_lock holds nothing there
    fcntl = None

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

__all__ = [
    "RunInUseError",
    "RunPaths",
    "data_source",
    "labels_match_run",
    "load_run",
    "to_json",
    "training_lock",
    "write_json",
]


class RunInUseError(OSError):
    """Another process is training the run directory (see :meth:`RunPaths.training_lock`)."""


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

    @property
    def lock(self) -> Path:
        """Present while a process trains the run (:meth:`training_lock`); not a run file."""
        return self.root / ".lock"

    def training_lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold ``root`` for this process while the block runs: a second training of the same
        directory (another terminal, an ``--overwrite`` of a run in progress) raises
        :class:`RunInUseError` at once instead of mixing its checkpoints with this one's or
        deleting its files. See :func:`training_lock` (the file is :attr:`lock`)."""
        return training_lock(self.lock, self.root)

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


@contextlib.contextmanager
def training_lock(lock: Path, held: Path) -> Iterator[None]:
    """Hold ``held`` (a run directory, a group's checkpoint) for this process while the block
    runs, by an exclusive lock on the file ``lock`` (see `_acquire`); raise
    :class:`RunInUseError` at once when another process holds it, or this one in another
    block. The lock is the kernel's: a killed process releases it, so nothing stale ever blocks
    a resume; the file is removed at the end. The directories that this call created for
    ``lock`` are removed again if the block fails leaving them empty."""
    if fcntl is None:
        yield
        return
    created = [d for d in (lock.parent, *lock.parent.parents) if not d.exists()]  # deepest first
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle, failed = None, True
    try:
        handle = _acquire(lock, held)  # a refusal leaves the holder's file alone
        yield
        failed = False
    finally:
        if handle is not None:
            lock.unlink(missing_ok=True)
            with _HELD_GUARD:
                _HELD.discard(lock.resolve())
            handle.close()
        if failed:
            _remove_empty(created)


_HELD: set[Path] = set()  # the locks this process holds (POSIX locks never conflict within one)
_HELD_GUARD = threading.Lock()


def _acquire(lock: Path, held: Path):
    """The open file ``lock``, locked by this process (see :func:`training_lock`). A POSIX
    record lock (``lockf``), not ``flock``: it belongs to the process, so DataLoader workers
    forked while training do not inherit it, and a killed run's workers, still exiting, do not
    refuse its resume. Within the process, :data:`_HELD` refuses a second holder."""
    refusal = RunInUseError(
        f"{held} is being trained by another process; let it finish or stop it "
        "(--resume auto then continues it), or choose another --output"
    )
    with _HELD_GUARD:
        if lock.resolve() in _HELD:
            raise refusal
        while True:
            handle = open(lock, "a")  # held until training_lock's block ends
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: another process holds it
                handle.close()
                raise refusal from None
            try:  # the holder may have finished and removed the file between open and lock
                if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                    _HELD.add(lock.resolve())
                    return handle
            except FileNotFoundError:
                pass
            handle.close()


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) while they are empty."""
    for directory in directories:
        if any(directory.iterdir()):
            return
        directory.rmdir()


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
    dataset: str | None = None,
    data_path: str | os.PathLike | None = None,
    data_options: dict[str, Any] | None = None,
    skip_bad: bool = False,
) -> tuple[nn.Module, Dataset, TrainConfig]:
    """A trained run's model and a split of its dataset, as ``RUN_DIR/config.yaml`` describes.

    The split gets the evaluation transform. ``train`` is the run's training set: its
    ``n_per_class`` / ``fraction`` subset, drawn with its seed as training drew it, without
    augmentation.

    Other data (``dataset``, ``data_path``): the split of that dataset instead, e.g. a folder
    of the user's images with object masks. The model keeps the run's classes and input
    channels, read from the run's own dataset (which must still be readable); the items'
    labels are renumbered into the run's classes by name when the run has every class of
    the new data (so accuracy means something), and left as they are otherwise (see
    :func:`labels_match_run`). No training subset is taken from other data.

    Args:
        run_dir: a directory written by ``spatial-entropy train``.
        split: the dataset split to build, with the evaluation transform.
        checkpoint: weights to load instead of ``RUN_DIR/model.safetensors``: a
            ``.safetensors`` file, a training checkpoint (``checkpoints/step_*``, with or
            without suffix) or a checkpoint directory (its latest checkpoint).
        with_masks: give the items object masks where the data has them (see
            ``VisionDataset.has_masks``: imagefolder has them when its masks folder exists).
        dataset: evaluate on this dataset instead of the run's.
        data_path: where the data is, instead of the run's ``data_path``.
        data_options: dataset options; added to the run's ``data_options`` when the dataset
            is the run's, else the only options.
        skip_bad: skip bad items (e.g. images without their mask) instead of raising.

    Returns:
        ``(model, dataset, config)``, the model in eval mode on the CPU, with the run's class
        names as ``model.classes``.

    Raises:
        FileNotFoundError: the run has no weights (yet), ``checkpoint`` does not exist, or
            the data is missing.
        UnreadableFileError: the weights file is truncated or corrupt (a ValueError).
        ValueError: the weights do not fit the model exactly, e.g. a classifier for another
            number of classes than the split has (nothing is adapted or re-initialised), or
            other data has another number of input channels than the run.
    """
    paths = RunPaths(run_dir)
    config = load_config(paths.config)
    weights = Path(checkpoint) if checkpoint is not None else paths.weights
    if weights.suffix == ".pt":  # a training checkpoint's state; its weights sit beside it
        weights = weights.with_suffix(".safetensors")
    if checkpoint is None and not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}; has the run finished?")
    own_data = (dataset or config.dataset) == config.dataset and data_path is None
    name, data_path, options = data_source(config, dataset, data_path, data_options)
    # The run's training subset, drawn by build_dataset exactly as engine.build_datasets does.
    subset = dict(n_per_class=config.n_per_class, fraction=config.fraction)
    eval_set = build_dataset(
        name,
        split,
        data_path=data_path,
        img_size=config.image_size(),
        is_train=False,
        seed=config.seed,
        with_masks=with_masks and dataset_class(name).has_masks(data_path, **options),
        skip_bad=skip_bad,
        options=options or None,
        **(subset if own_data and split == "train" else {}),
    )
    classes, in_chans = eval_set.classes, eval_set.in_chans
    if not own_data:
        classes, in_chans = _run_classes(config, paths)
        if eval_set.in_chans != in_chans:
            raise ValueError(
                f"{run_dir} was trained on {in_chans}-channel images; {name} at {data_path} "
                f"gives {eval_set.in_chans}-channel images"
            )
        _renumber_labels(eval_set, classes)
    model = create_model(
        config.model,
        num_classes=len(classes),
        img_size=config.image_size(),
        in_chans=in_chans,
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
            f"split {split!r} ({len(classes)} classes, {in_chans} input channels): {exc}"
        ) from exc
    model.classes = list(classes)
    return model.eval(), eval_set, config


def data_source(
    config: TrainConfig,
    dataset: str | None = None,
    data_path: str | os.PathLike | None = None,
    data_options: dict[str, Any] | None = None,
) -> tuple[str, str | os.PathLike | None, dict[str, Any]]:
    """``(dataset, data_path, options)`` that :func:`load_run` reads: the run's, with the
    given ones in their place (``data_options`` added to the run's own for its dataset)."""
    name = dataset or config.dataset
    same = name == config.dataset
    if data_path is None and same:
        data_path = config.data_path
    return name, data_path, (config.data_options if same else {}) | (data_options or {})


def labels_match_run(model: nn.Module, dataset: Dataset) -> bool:
    """Whether ``dataset``'s labels are the classes of the run ``model`` comes from (as
    :func:`load_run` gives them), so that its accuracy means something."""
    return list(dataset.classes) == list(model.classes)


def _run_classes(config: TrainConfig, paths: RunPaths) -> tuple[list[str], int]:
    """The class names and input channels of the run's own dataset."""
    try:
        own = build_dataset(
            config.dataset,
            config.val_split,
            data_path=config.data_path,
            img_size=config.image_size(),
            options=config.data_options or None,
        )
    except (OSError, ValueError) as exc:
        raise type(exc)(
            f"the classes of {paths.root} come from its own dataset ({config.dataset}), "
            f"which cannot be read: {exc}"
        ) from exc
    return list(own.classes), own.in_chans


def _renumber_labels(dataset: Dataset, classes: list[str]) -> None:
    """Give ``dataset``'s items the indices of their class names in ``classes`` when every
    class of ``dataset`` is there (e.g. a folder holding some of the run's classes)."""
    index = {name: i for i, name in enumerate(classes)}
    if not set(dataset.classes) <= index.keys():
        return
    dataset.targets = [index[dataset.classes[label]] for label in dataset.targets]
    dataset.classes = list(classes)
