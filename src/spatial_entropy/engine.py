"""Training: the DeiT recipe from timm's parts, DDP, checkpoints and per-epoch logs."""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_weight_decay
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.scheduler_factory import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from spatial_entropy.attention import AttentionCapture, unwrap_model
from spatial_entropy.checkpoint import (
    RankState,
    TrainState,
    UnreadableFileError,
    checkpoints_to_resume,
    load_checkpoint,
    save_checkpoint,
    save_weights,
)
from spatial_entropy.config import (
    RESUMABLE_KEYS,
    TrainConfig,
    config_changes,
    load_config,
    save_config,
)
from spatial_entropy.data import build_dataset
from spatial_entropy.distributed import (
    DistributedInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from spatial_entropy.evaluation import evaluate, evaluate_run  # re-exported (their old home)
from spatial_entropy.files import atomic_write
from spatial_entropy.loader import (
    DeviceTrainBatches,
    TensorEvalBatches,
    build_eval_loader,
    build_train_loader,
    device_data_reason,
)
from spatial_entropy.models import compile_model, create_model
from spatial_entropy.regularizers import (
    DRLocRegularizer,
    Regularizer,
    SpatialEntropyRegularizer,
)
from spatial_entropy.rng import get_rng_state, set_rng_state
from spatial_entropy.runs import RunPaths, write_json

__all__ = [
    "train",
    "train_one_epoch",
    "train_step",
    "evaluate",
    "evaluate_run",
    "build_regularizers",
    "build_training_run",
    "build_datasets",
]


def build_regularizers(config: TrainConfig, rank: int = 0) -> list[Regularizer]:
    """The auxiliary losses a config asks for, in a fixed order: spatial entropy (when
    ``se.weight`` > 0), then DRLoc (when ``drloc.weight`` > 0).

    The order fixes the optimiser's parameter groups and the checkpoint layout. DRLoc samples
    its position pairs with the seed ``seed * 65536 + rank``, so every DDP rank draws its own
    pairs and a run is reproducible from its config.
    """
    regularizers: list[Regularizer] = []
    if config.se.weight > 0:
        se = config.se
        regularizers.append(SpatialEntropyRegularizer(se.weight, se.schedule, se.warmup_epochs))
    if config.drloc.weight > 0:
        drloc = config.drloc
        seed = config.seed * 65536 + rank
        regularizers.append(DRLocRegularizer(drloc.weight, drloc.pairs, drloc.hidden, seed))
    return regularizers


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``amp`` ("auto": bf16 or fp16 on CUDA, off on CPU)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


@dataclass
class TrainingRun:
    """What the train step works on. ``model`` is DDP-wrapped when distributed, then compiled
    with ``compile``; :func:`unwrap_model` gives the bare model (saved, evaluated, EMA)."""

    config: TrainConfig
    info: DistributedInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    regularizers: list[Regularizer]
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    # Per-step statistics summed over the current epoch, on the device; a mid-epoch checkpoint
    # saves them so that a resumed epoch logs the same means as an unbroken one.
    epoch_sums: dict[str, Tensor] = field(default_factory=dict)

    def autocast(self) -> torch.autocast:
        enabled = self.amp_dtype is not None
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype, enabled=enabled)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The model's parameters and those of the regularisers' modules (the DRLoc head)."""
        parameters = list(self.model.parameters())
        for reg in self.regularizers:
            if reg.module is not None:
                parameters += reg.module.parameters()
        return parameters

    def checkpoint_state(
        self, epoch: int, batch: int, best: dict[str, Any], elapsed: float
    ) -> TrainState | None:
        """The checkpoint state after ``batch`` batches of ``epoch``.

        Collective: every rank contributes its :class:`RankState`; the optimiser, schedule,
        scaler and EMA states are taken on rank 0 only (the other ranks get None, as they
        write nothing).
        """
        own = RankState(
            get_rng_state(), {k: v.cpu() for k, v in self.epoch_sums.items()},
            {reg.name: reg.state_dict() for reg in self.regularizers},
        )  # fmt: skip
        ranks = all_gather_object(own)
        if not self.info.is_main:
            return None
        return TrainState(
            epoch=epoch, batch=batch, step=self.step, elapsed=elapsed, best=best,
            global_batch=self.config.batch_size * self.info.world_size,
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(), ranks=ranks,
            regularizer_modules={
                reg.name: unwrap_model(reg.module).state_dict()
                for reg in self.regularizers if reg.module is not None
            },
        )  # fmt: skip

    def restore_rank_state(self, state: TrainState) -> None:
        """Continue this rank's random streams, epoch sums and regulariser states from
        ``state``.

        Raises:
            ValueError: a regulariser with state (DRLoc's sampling stream) has none saved.
        """
        own = state.ranks[self.info.rank]
        set_rng_state(own.rng)
        self.epoch_sums = {k: v.to(self.info.device) for k, v in own.epoch_sums.items()}
        for reg in self.regularizers:
            if reg.name in own.regularizers:
                reg.load_state_dict(own.regularizers[reg.name])
            elif reg.state_dict():  # a regulariser without state (SE) is fine in any checkpoint
                raise ValueError(
                    f"checkpoint step_{state.step:08d} holds no state of the {reg.name!r} "
                    "regulariser; it was written without it: resume with the run's own config"
                )


def train_step(run: TrainingRun, images: Tensor, targets: Tensor, progress: float) -> Tensor:
    """One optimiser step on a batch (already on the device, Mixup applied); returns the task
    loss. ``progress`` is the training time in epochs that the regularisers' schedules see."""
    cfg = run.config
    for reg in run.regularizers:
        reg.set_progress(progress, cfg.epochs)
    with run.autocast():
        loss = run.criterion(run.model(images), targets)
        total = loss + sum(reg() for reg in run.regularizers)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if cfg.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        dispatch_clip_grad(run.trainable_parameters(), cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.step += 1
    run.scheduler.step_update(run.step)
    if run.ema is not None:
        run.ema.update(unwrap_model(run.model), step=run.step)
    return loss


def train_one_epoch(
    run: TrainingRun,
    loader: DataLoader | DeviceTrainBatches,
    epoch: int,
    start_batch: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Train until the loader is exhausted or ``run.total_steps`` is reached.

    ``on_step(epoch, batches_done)`` runs after every optimiser step (the engine saves
    checkpoints there). Returns the epoch's mean task loss and regulariser statistics
    (reduced over ranks), the last learning rate and the throughput in images/s (all ranks).
    """
    cfg, device = run.config, run.info.device
    run.model.train()
    if start_batch == 0:
        run.epoch_sums = {}
    current: dict[str, float] = {}  # regulariser statistics that are not summed (e.g. λ)
    batches, start_time = 0, time.perf_counter()
    progress = tqdm(
        loader, desc=f"epoch {epoch}", total=run.steps_per_epoch, initial=start_batch,
        disable=not run.info.is_main, dynamic_ncols=True,
    )  # fmt: skip
    for batch, (images, targets) in enumerate(progress, start=start_batch):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if run.mixup is not None:
            images, targets = run.mixup(images, targets)
        t = epoch + batch / run.steps_per_epoch if cfg.se.per_step else float(epoch)
        loss = train_step(run, images, targets, t)
        current |= _add_step_statistics(run, loss)
        batches += 1
        if batches % cfg.log_every == 0 and run.info.is_main:
            rate = batches * images.shape[0] * run.info.world_size
            _show_progress(progress, run.epoch_sums, rate / (time.perf_counter() - start_time))
        if on_step is not None:
            on_step(epoch, batch + 1)
        if run.step >= run.total_steps:
            break
    progress.close()
    return _epoch_statistics(run, epoch, current, batches, time.perf_counter() - start_time)


def _add_step_statistics(run: TrainingRun, loss: Tensor) -> dict[str, float]:
    """Add the step's loss and tensor statistics to ``run.epoch_sums``; return the others."""
    # Running sums stay on the device; only the progress bar refresh synchronises.
    step_stats = {"batches": torch.ones((), device=run.info.device), "loss": loss.detach()}
    plain = {}
    for reg in run.regularizers:
        for key, value in reg.stats().items():
            if isinstance(value, Tensor):
                step_stats[key] = value
            else:
                plain[key] = value
    for key, value in step_stats.items():
        run.epoch_sums[key] = run.epoch_sums.get(key, 0.0) + value.double()
    return plain


def _show_progress(progress: tqdm, sums: dict[str, Tensor], images_per_s: float) -> None:
    count = sums["batches"].item()
    shown = {k: f"{v.item() / count:.4f}" for k, v in sums.items() if k != "batches"}
    progress.set_postfix(shown | {"img/s": f"{images_per_s:.0f}"}, refresh=False)


def _epoch_statistics(
    run: TrainingRun, epoch: int, current: dict[str, float], batches: int, elapsed: float
) -> dict[str, float]:
    """The epoch's means over all ranks (``train_<key>``), ``current``, the learning rate and
    the throughput. Collective."""
    sums = run.epoch_sums
    keys = sorted(sums)
    totals = dict(
        zip(keys, all_reduce_sum(torch.stack([sums[k] for k in keys])).tolist(), strict=True)
    )
    count = max(totals.pop("batches", 0.0), 1.0)
    stats = {f"train_{k}": v / count for k, v in totals.items()}
    if not math.isfinite(stats["train_loss"]):  # every rank sees the reduced value and stops
        raise FloatingPointError(
            f"training loss is {stats['train_loss']} in epoch {epoch} (step {run.step}); "
            "lower lr, set clip_grad or amp=off"
        )
    stats |= current | {"lr": run.optimizer.param_groups[0]["lr"]}
    cfg = run.config
    stats["images_per_s"] = batches * cfg.batch_size * run.info.world_size / max(elapsed, 1e-9)
    stats["epoch_time_s"] = elapsed
    return stats


ATTENTION_KEYS = ("se_mean", "regions_mean", "single_region_share")
"""The attention statistics that training logs for the validation set (models with [CLS])."""


def _has_cls_attention(model: nn.Module) -> bool:
    """Whether :class:`AttentionCapture` can read ``model``'s [CLS] attention (a timm ViT with a
    class token), so that evaluation can add the attention statistics."""
    try:
        AttentionCapture(model).remove()
    except (TypeError, ValueError):
        return False
    return True


def build_datasets(config: TrainConfig, info: DistributedInfo) -> tuple[Dataset, Dataset]:
    """The (train, validation) datasets of a config, with its augmentation recipe."""
    common = dict(
        data_path=config.data_path,
        img_size=config.image_size(),
        seed=config.seed,
        options=config.data_options or None,
    )
    augment = {"auto_augment": config.auto_augment, "reprob": config.reprob} | config.augment
    datasets = None
    # Rank 0 goes first so that a dataset that is generated or cached on first use is
    # written once; the other ranks then read it.
    for turn in (True, False):
        if info.is_main == turn:
            train_set = build_dataset(
                config.dataset, "train", is_train=True, augment=augment,
                n_per_class=config.n_per_class, fraction=config.fraction, **common,
            )  # fmt: skip
            val_set = build_dataset(
                config.dataset, config.val_split, is_train=False,
                fraction=config.val_fraction, **common,
            )  # fmt: skip
            datasets = (train_set, val_set)
        barrier()
    return datasets


def build_loaders(
    cfg: TrainConfig, train_set: Dataset, val_set: Dataset, info: DistributedInfo
) -> tuple[DataLoader | DeviceTrainBatches, Iterable]:
    """The training and evaluation loaders: with ``data_on_device`` "auto", each set that
    allows it is served from a copy on the device (the same batches, bit for bit, without
    loader processes: `DeviceTrainBatches`, `TensorEvalBatches`), the others by DataLoaders."""
    keep = cfg.data_on_device == "auto"
    if keep and device_data_reason(train_set, is_train=True) is None:
        train_loader = DeviceTrainBatches(train_set, cfg.batch_size, info, seed=cfg.seed)
    else:
        train_loader = build_train_loader(
            train_set, cfg.batch_size, info, seed=cfg.seed, num_workers=cfg.num_workers
        )
    if keep and device_data_reason(val_set, is_train=False) is None:
        return train_loader, TensorEvalBatches(val_set, cfg.batch_size, info)
    return train_loader, build_eval_loader(
        val_set, cfg.batch_size, info, num_workers=cfg.num_workers
    )


def _criterion(config: TrainConfig, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    if config.mixup > 0 or config.cutmix > 0:
        if config.batch_size % 2:
            raise ValueError(f"Mixup/CutMix need an even batch_size, got {config.batch_size}")
        mixup = Mixup(
            mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob, label_smoothing=config.smoothing,
            num_classes=num_classes,
        )  # fmt: skip
        return SoftTargetCrossEntropy(), mixup
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(config.smoothing), None
    return nn.CrossEntropyLoss(), None


def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's per-step schedule of ``cfg`` (``sched``, warm-up, ``min_lr``) for ``optimizer``."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    return scheduler


def check_recipe(cfg: TrainConfig) -> None:
    """Refuse, in one line and before any data is read, an optimiser (``opt``) or schedule
    (``sched``) that timm cannot build: timm's own factories judge, on a one-weight stand-in.

    Raises:
        ValueError: names the key, timm's reason and, for ``opt``, close optimiser names.
    """
    try:
        optimizer = create_optimizer_v2(
            nn.Linear(1, 1), opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    except Exception as error:  # timm raises several types (unknown name, missing package)
        name = cfg.opt.lower().split("_")[-1]
        close = difflib.get_close_matches(name, list_optimizers(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"config key 'opt' {cfg.opt!r}: {error}{hint}") from None
    try:
        _scheduler(cfg, optimizer, steps_per_epoch=1)
    except Exception as error:
        raise ValueError(f"config key 'sched' {cfg.sched!r}: {error}") from None


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, modules: Iterable[nn.Module] = ()
) -> torch.optim.Optimizer:
    """timm's optimiser of ``cfg`` for ``model`` (its weight-decay and layer-decay groups), then
    a group pair for each of the regularisers' ``modules``: they train with the scheduled lr
    (no lr_scale, so under layer decay they get the classifier head's); weights decay, biases
    do not. Build the scheduler after it: it records every group's initial lr."""
    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay
    )
    for module in modules:
        for group in param_groups_weight_decay(module, cfg.weight_decay):
            optimizer.add_param_group(group)
    return optimizer


def initial_model(
    cfg: TrainConfig, num_classes: int, in_chans: int, device: torch.device
) -> nn.Module:
    """The run's model with its initial weights, drawn from ``cfg.seed`` (the same on every
    rank; DDP also broadcasts rank 0's)."""
    torch.manual_seed(cfg.seed)
    return create_model(
        cfg.model, num_classes=num_classes, img_size=cfg.image_size(), in_chans=in_chans,
        drop_path_rate=cfg.drop_path, no_last_skip=cfg.no_last_skip, checkpoint=cfg.checkpoint,
        **cfg.model_kwargs,
    ).to(device)  # fmt: skip


def build_training_run(
    cfg: TrainConfig,
    info: DistributedInfo,
    num_classes: int,
    in_chans: int,
    steps_per_epoch: int,
    resumed: tuple[dict[str, Tensor], TrainState] | None = None,
) -> TrainingRun:
    """Model (DDP-wrapped under torchrun), optimiser, schedule, scaler, EMA, regularisers and
    loss of a run, restored from ``resumed`` (weights, state) if given; the ranks' own states
    (RNGs, epoch sums, regulariser states) are restored by
    :meth:`TrainingRun.restore_rank_state`.

    Raises:
        ValueError: ``resumed`` holds other regulariser modules than the config trains.
    """
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    model = initial_model(cfg, num_classes, in_chans, info.device)
    weights, state = resumed if resumed is not None else (None, TrainState())
    if weights is not None:
        model.load_state_dict(weights)
    # EMA copies the bare model before the regularisers hook it (a deep copy copies the hooks)
    # and never sees their modules.
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    # Attached before the optimiser: DRLoc creates its head here, from the global RNG right
    # after the model's initial weights, in fresh and resumed runs alike.
    regularizers = build_regularizers(cfg, info.rank)
    for reg in regularizers:
        try:
            reg.attach(model)
        except ValueError as error:  # e.g. SE (on by default) on a model without [CLS]
            raise ValueError(f"{error}; {reg.name}.weight=0 turns {reg.name} off") from error
    modules = {reg.name: reg.module for reg in regularizers if reg.module is not None}
    optimizer = build_optimizer(cfg, model, modules.values())
    scheduler = _scheduler(cfg, optimizer, steps_per_epoch)
    amp_dtype = autocast_dtype(cfg.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    if weights is not None:
        if state.regularizer_modules.keys() != modules.keys():
            raise ValueError(
                f"checkpoint step_{state.step:08d} holds the regulariser modules "
                f"{sorted(state.regularizer_modules)}, this config trains {sorted(modules)} "
                "(drloc.weight differs?): resume with the run's own config"
            )
        for name, module in modules.items():
            module.load_state_dict(state.regularizer_modules[name])
        optimizer.load_state_dict(state.optimizer)
        # The schedule is a function of the config and the step (not restored): the same
        # learning rate as saved, or the one of a longer run when `epochs` was raised.
        scheduler.step_update(state.step)
        if state.scaler:  # empty when saved without fp16 (`device` may change on resume)
            scaler.load_state_dict(state.scaler)
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
        # The regulariser calls whatever ``module`` holds: wrapped, its gradients are averaged
        # over the ranks like the model's.
        for reg in regularizers:
            if reg.module is not None:
                reg.module = DistributedDataParallel(reg.module, device_ids=device_ids)
    if cfg.compile:  # last: after DDP (as timm) and after the hooks, which dynamo traces
        model = compile_model(model, cfg.compile_backend, cfg.compile_mode)
    criterion, mixup = _criterion(cfg, num_classes)
    return TrainingRun(
        cfg, info, model, optimizer, scheduler, scaler, criterion, regularizers, mixup, ema,
        amp_dtype, steps_per_epoch, total_steps, step=state.step,
    )  # fmt: skip


def _logged_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``log.csv`` (none when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunLog:
    """Per-epoch rows in ``log.csv`` (and TensorBoard if installed); main process only.

    The rows of epochs before ``first_epoch`` are kept; the others will run again (after a
    resume) and are dropped. The file is rewritten at each :meth:`append` only.
    """

    def __init__(self, run_dir: Path, enabled: bool, first_epoch: int) -> None:
        self.path = RunPaths(run_dir).log
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        self.rows = [r for r in _logged_rows(self.path) if int(r["epoch"]) < first_epoch]
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            return
        self.tensorboard = SummaryWriter(str(RunPaths(run_dir).tensorboard))

    def _write(self) -> None:
        text = io.StringIO()
        if self.rows:
            # Columns in order of first appearance: a run resumed by a newer version keeps its
            # earlier rows and gains the new columns (empty in those rows).
            columns = list(dict.fromkeys(key for row in self.rows for key in row))
            writer = csv.DictWriter(text, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write(self.path, text.getvalue().encode())

    def append(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.rows.append({k: "" if v is None else v for k, v in row.items()})
        self._write()
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    datasets: tuple[Dataset, Dataset] | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says and write the run to ``run_dir``; return the final metrics.

    ``run_dir`` receives ``config.yaml``, ``log.csv``, ``checkpoints/``, and at the end
    ``model.safetensors`` (the trained weights; ``model_ema.safetensors`` too with EMA) and
    ``metrics.json``. The regularisers' trainable modules (the DRLoc head) are saved only in
    the checkpoints. Nothing is written before the config, the data and the model have been
    built. ``datasets`` replaces ``(train, val)`` built from the config; each needs
    ``num_classes`` and ``in_chans``.

    With ``resume``, training continues from the latest readable checkpoint (mid-epoch
    included), reproducing the uninterrupted run bit for bit; ``config`` may differ from
    ``RUN_DIR/config.yaml`` only in :data:`~spatial_entropy.config.RESUMABLE_KEYS`. A run that
    has already done the steps ``config`` asks for is left as it is (its metrics are returned).
    Without ``resume``, a ``run_dir`` that holds a run is refused unless ``overwrite``, which
    deletes that run's files (:meth:`RunPaths.remove_run`) before the new run writes its own.

    Under torchrun, every process calls this; only rank 0 writes files. While it trains, rank 0
    holds ``run_dir`` (:meth:`RunPaths.training_lock`): a second training of it is refused.

    Raises:
        FileExistsError: ``run_dir`` holds a run, and neither ``resume`` nor ``overwrite``.
        RunInUseError: another process is training ``run_dir`` (an ``OSError``).
        ValueError: a resume that would change a key outside ``RESUMABLE_KEYS``, shorten the
            run, or change the global batch; ``UnreadableFileError`` when no checkpoint can be
            read.
        FloatingPointError: the training or validation loss is not finite.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    info = init_distributed(config.device)
    try:
        with _hold_run_dir(RunPaths(run_dir), info):
            return _train(config, Path(run_dir), info, resume, overwrite, datasets)
    finally:
        cleanup_distributed()


@contextlib.contextmanager
def _hold_run_dir(paths: RunPaths, info: DistributedInfo) -> Iterator[None]:
    """Rank 0 holds the run directory while training (:meth:`RunPaths.training_lock`); when
    it cannot (another process holds it: ``RunInUseError``; an unwritable directory), every
    rank raises, rather than the others waiting for rank 0 in their first collective."""
    with contextlib.ExitStack() as stack:
        error = None
        if info.is_main:
            try:
                stack.enter_context(paths.training_lock())
            except OSError as exc:
                error = exc
        message = all_gather_object(None if error is None else str(error))[0]
        if message is not None:
            raise error or OSError(message)
        yield


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    info: DistributedInfo,
    resume: bool,
    overwrite: bool,
    datasets: tuple[Dataset, Dataset] | None,
) -> dict[str, Any]:
    paths = RunPaths(run_dir)
    # The checks only read: a refused command leaves run_dir as it was.
    resumed = None
    if resume:
        _check_resumable_config(paths, cfg)
        resumed = _read_checkpoint_to_resume(paths, cfg.batch_size, info)
        if resumed is None and paths.run_files():
            finished = _resume_without_checkpoint(paths, cfg, info)
            if finished is not None:
                return finished
    elif paths.run_files() and not overwrite:
        names = ", ".join(path.name for path in paths.run_files())
        raise FileExistsError(
            f"{run_dir} already holds a run ({names}); pass --resume auto to continue it, "
            "--overwrite to delete it and start again, or choose another --output"
        )
    check_recipe(cfg)
    train_set, val_set = datasets if datasets is not None else build_datasets(cfg, info)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, info)
    run = build_training_run(
        cfg, info, train_set.num_classes, train_set.in_chans, len(train_loader),
        None if resumed is None else resumed[1:],
    )  # fmt: skip
    try:
        return _train_run(run, paths, train_loader, val_loader, resumed)
    finally:
        for reg in run.regularizers:
            reg.remove()


def _train_run(
    run: TrainingRun,
    paths: RunPaths,
    train_loader: DataLoader | DeviceTrainBatches,
    val_loader: Iterable,
    resumed: tuple[Path, dict[str, Tensor], TrainState] | None,
) -> dict[str, Any]:
    """Train ``run`` from its resumed state to ``run.total_steps`` and write the run's files."""
    cfg, info = run.config, run.info
    stem, state = (None, TrainState()) if resumed is None else (resumed[0], resumed[2])
    if state.step > run.total_steps:
        raise ValueError(
            f"{stem} is at step {state.step}, beyond the {run.total_steps} steps that epochs "
            f"{cfg.epochs} and max_steps {cfg.max_steps} give: a run is not shortened"
        )
    if state.step == run.total_steps and _has_final_files(paths, cfg):
        if info.is_main:
            print(
                f"{paths.root} has finished ({state.step} steps); nothing to do (a larger "
                "max_steps or epochs continues it)"
            )
        return json.loads(paths.metrics.read_text())
    if info.is_main:  # the first write to the run directory
        if resumed is None:  # no file of an earlier run stays (overwrite, or no checkpoint yet)
            paths.remove_run()
        for stale in paths.stale_temporaries():
            stale.unlink()
        paths.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)
    # Training randomness (dropout, drop path, Mixup) differs per rank, as in DeiT.
    random_seed(cfg.seed, info.rank)
    if resumed is not None:
        run.restore_rank_state(state)
        if info.is_main:
            print(f"resumed from {stem} (epoch {state.epoch}, step {state.step})")

    best, clock = state.best, time.perf_counter() - state.elapsed  # elapsed = now - clock

    def save(epoch: int, batch: int) -> None:
        # Collective: every rank contributes; rank 0 gets the state and writes it.
        snapshot = run.checkpoint_state(epoch, batch, best, time.perf_counter() - clock)
        if info.is_main:
            model = unwrap_model(run.model)
            save_checkpoint(
                paths.checkpoints, run.step, model, snapshot.to_dict(), cfg.keep_checkpoints
            )

    def on_step(epoch: int, batch: int) -> None:
        every = cfg.checkpoint_every
        if every and run.step % every == 0 and batch < run.steps_per_epoch:
            save(epoch, batch)

    log = RunLog(paths.root, info.is_main, state.epoch)
    start_batch, val, ema_val, train_stats = state.batch, None, None, {}
    for epoch in range(state.epoch, cfg.epochs):
        if run.step >= run.total_steps:
            break
        train_loader.sampler.set_position(epoch, start_batch)
        train_stats = train_one_epoch(run, train_loader, epoch, start_batch, on_step)
        done = run.step >= run.total_steps or epoch + 1 == cfg.epochs
        val = ema_val = None
        if done or (epoch + 1) % cfg.eval_every == 0:
            val, ema_val = _evaluate_all(run, val_loader)
            if val["top1"] > best.get("top1", -1.0):
                best = {"top1": val["top1"], "epoch": epoch, "step": run.step}
        log.append(_log_row(epoch, run, train_stats, val, ema_val))
        # The first epoch always saves: a logged run always has a checkpoint to resume from.
        if done or epoch % cfg.checkpoint_epochs == 0:
            # A max_steps stop mid-epoch is a position that a longer run can resume from.
            batches = run.step - epoch * run.steps_per_epoch
            save(*((epoch + 1, 0) if batches == run.steps_per_epoch else (epoch, batches)))
        start_batch = 0
    log.close()

    if val is None:  # killed after its last checkpoint: the run ends without training
        val, ema_val = _evaluate_all(run, val_loader)
        train_stats = _last_logged_train_stats(paths.log) if info.is_main else {}
    metrics = _final_metrics(run, val, ema_val, train_stats, best, time.perf_counter() - clock)
    if info.is_main:
        save_weights(unwrap_model(run.model), paths.weights)
        if run.ema is not None:
            save_weights(run.ema.module, paths.ema_weights)
        write_json(paths.metrics, metrics)
    return metrics


def _has_final_files(paths: RunPaths, cfg: TrainConfig) -> bool:
    """Whether the files that a run writes when it ends are there."""
    final = [paths.metrics, paths.weights] + ([paths.ema_weights] if cfg.model_ema else [])
    return all(path.is_file() for path in final)


def _last_logged_train_stats(log: Path) -> dict[str, float]:
    """The training statistics of the last row of ``log.csv`` (as :func:`train_one_epoch`
    returned them), for a run whose last epoch was logged in an earlier session."""
    rows = _logged_rows(log)
    if not rows:
        return {}
    return {
        key: float(value)
        for key, value in rows[-1].items()
        if value != "" and (key.startswith("train_") or key == "images_per_s")
    }


def _check_resumable_config(paths: RunPaths, cfg: TrainConfig) -> None:
    """Refuse a resume whose config changes a key outside :data:`RESUMABLE_KEYS`.

    Raises:
        ValueError: names each such key with the run's value and the requested one.
    """
    if not paths.config.is_file():
        return
    changes = config_changes(load_config(paths.config), cfg)
    fixed = {key: values for key, values in changes.items() if key not in RESUMABLE_KEYS}
    if fixed:
        listed = "; ".join(f"{k!r}: {old!r} -> {new!r}" for k, (old, new) in fixed.items())
        raise ValueError(
            f"a resumed run may change only {', '.join(RESUMABLE_KEYS)}; this one would change "
            f"{paths.config}'s {listed}"
        )


def _resume_without_checkpoint(
    paths: RunPaths, cfg: TrainConfig, info: DistributedInfo
) -> dict[str, Any] | None:
    """A resume of a run directory that holds no checkpoint: the metrics of a finished run
    that is asked for nothing more, or None to start from step 0 when nothing would be lost.

    Raises:
        ValueError: the run cannot continue and starting again would drop its results.
    """
    length = {"epochs": cfg.epochs, "max_steps": cfg.max_steps}
    if paths.metrics.is_file() and _has_final_files(paths, cfg):
        saved = load_config(paths.config) if paths.config.is_file() else None
        if saved is not None and length == {"epochs": saved.epochs, "max_steps": saved.max_steps}:
            if info.is_main:
                print(f"{paths.root} has finished; nothing to do (it has no checkpoints)")
            return json.loads(paths.metrics.read_text())
        raise ValueError(
            f"{paths.root} holds a finished run without checkpoints in {paths.checkpoints}: "
            "it cannot continue (pass --overwrite to start again)"
        )
    if _logged_rows(paths.log) or paths.weights.is_file() or paths.metrics.is_file():
        raise ValueError(
            f"{paths.root} holds a run's results but no checkpoint in {paths.checkpoints} to "
            "continue from (pass --overwrite to start again)"
        )
    if info.is_main:
        print(f"{paths.root} holds no checkpoint yet: starting at step 0")
    return None


def _read_checkpoint_to_resume(
    paths: RunPaths, batch_size: int, info: DistributedInfo
) -> tuple[Path, dict[str, Tensor], TrainState] | None:
    """``(stem, weights, state)`` of the checkpoint that ``RUN_DIR/checkpoints/latest`` names,
    or of the newest older one that can be read when it cannot (said on stderr); None when
    the run has no checkpoint.

    Raises:
        UnreadableFileError: no checkpoint can be read (names the newest one's file).
        ValueError: the checkpoint was written with another global batch (``batch_size`` x
            processes), so the data order and the schedule would not continue.
    """
    stems = checkpoints_to_resume(paths.checkpoints) if paths.checkpoints.is_dir() else []
    errors: list[UnreadableFileError] = []
    for stem in stems:
        try:
            weights, saved = load_checkpoint(stem)
        except UnreadableFileError as exc:
            errors.append(exc)
            continue
        if errors and info.is_main:
            print(f"{errors[0]}; resuming from the older {stem.name}", file=sys.stderr)
        state = TrainState.from_dict(saved)
        if state.global_batch != batch_size * info.world_size:
            raise ValueError(
                f"{stem} was written with a global batch of {state.global_batch}; "
                f"this run has {batch_size} x {info.world_size} processes"
            )
        return stem, weights, state
    if errors:
        older = "; no older checkpoint can be read either" if len(errors) > 1 else ""
        raise UnreadableFileError(f"{errors[0]}{older}") from errors[0]
    return None


def _final_metrics(
    run: TrainingRun,
    val: dict[str, float],
    ema_val: dict[str, float] | None,
    train_stats: dict[str, float],
    best: dict[str, Any],
    elapsed: float,
) -> dict[str, Any]:
    """``metrics.json``: the last validation, the best top-1, the run's length and time, the
    last epoch's training statistics, and the EMA model's validation (with EMA)."""
    metrics = {
        **val, "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
        "steps": run.step, "epochs": run.config.epochs, "train_time_s": elapsed,
        **{k: v for k, v in train_stats.items() if k.startswith("train_") or k == "images_per_s"},
    }  # fmt: skip
    if run.ema is not None:
        metrics["ema"] = ema_val
    return metrics


def _log_row(
    epoch: int,
    run: TrainingRun,
    train_stats: dict[str, float],
    val: dict[str, float] | None,
    ema_val: dict[str, float] | None,
) -> dict[str, Any]:
    """The ``log.csv`` row of an epoch; validation columns are empty when it was not evaluated."""
    row = {"epoch": epoch, "step": run.step, **train_stats, **_prefixed(val, "val_")}
    if run.ema is not None:
        row |= _prefixed(ema_val, "val_ema_")
    return row


def _prefixed(metrics: dict[str, float] | None, prefix: str) -> dict[str, float | None]:
    keys = ("top1", "top5", "loss", *ATTENTION_KEYS)
    return {f"{prefix}{k}": None if metrics is None else metrics.get(k) for k in keys}


def _evaluate_all(
    run: TrainingRun, loader: Iterable
) -> tuple[dict[str, float], dict[str, float] | None]:
    """The validation metrics of the model and of its EMA (None without EMA).

    Raises:
        FloatingPointError: a validation loss is not finite (the run stops before it logs).
    """
    # The bare model: ranks may hold shards of different lengths, and DDP's forward may sync.
    model = unwrap_model(run.model)
    device, attention = run.info.device, _has_cls_attention(model)
    metrics = _evaluate_for_log(model, loader, device, run.amp_dtype, attention)
    ema_metrics = None
    if run.ema is not None:
        ema_metrics = _evaluate_for_log(run.ema.module, loader, device, run.amp_dtype, attention)
    for name, measured in (("", metrics), ("EMA ", ema_metrics)):
        if measured is not None and not math.isfinite(measured["loss"]):
            raise FloatingPointError(
                f"{name}validation loss is {measured['loss']} at step {run.step}: the model's "
                "outputs are not finite; lower lr, set clip_grad or amp=off"
            )
    return metrics, ema_metrics


def _evaluate_for_log(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    attention: bool,
) -> dict[str, float]:
    """Accuracy and, for a model with [CLS] attention, the :data:`ATTENTION_KEYS`."""
    metrics = evaluate(model, loader, device, amp_dtype, attention=attention)
    return {k: v for k, v in metrics.items() if k in ("top1", "top5", "loss", "images")
            or k in ATTENTION_KEYS}  # fmt: skip
