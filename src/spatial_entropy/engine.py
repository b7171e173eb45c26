"""Training and evaluation loops: the DeiT recipe from timm's parts, DDP, checkpoints and logs."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler.scheduler import Scheduler
from timm.scheduler.scheduler_factory import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from spatial_entropy.attention import AttentionCapture, unwrap_model
from spatial_entropy.checkpoint import (
    atomic_write,
    get_rng_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_weights,
    set_rng_state,
)
from spatial_entropy.config import TrainConfig, save_config
from spatial_entropy.data import build_dataset
from spatial_entropy.distributed import (
    DistributedInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
)
from spatial_entropy.evaluation import evaluate, evaluate_run
from spatial_entropy.loader import build_eval_loader, build_train_loader
from spatial_entropy.models import create_model
from spatial_entropy.regularizers import Regularizer, SpatialEntropyRegularizer
from spatial_entropy.runs import RunPaths

__all__ = [
    "train",
    "train_one_epoch",
    "evaluate",
    "evaluate_run",
    "build_regularizers",
    "build_training_run",
    "build_datasets",
]


def build_regularizers(config: TrainConfig) -> list[Regularizer]:
    """The auxiliary losses a config asks for (none when ``se.weight`` is 0)."""
    if config.se.weight == 0:
        return []
    return [
        SpatialEntropyRegularizer(config.se.weight, config.se.schedule, config.se.warmup_epochs)
    ]


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for ``amp`` ("auto": bf16 or fp16 on CUDA, off on CPU)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


@dataclass
class TrainingRun:
    """What the train step works on. ``model`` is DDP-wrapped when distributed."""

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


def train_one_epoch(
    run: TrainingRun,
    loader: DataLoader,
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
    sums = run.epoch_sums
    current: dict[str, float] = {}
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
        for reg in run.regularizers:
            reg.set_progress(t, cfg.epochs)

        with run.autocast():
            loss = run.criterion(run.model(images), targets)
            total = loss + sum(reg() for reg in run.regularizers)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(total).backward()
        if cfg.clip_grad is not None:
            run.scaler.unscale_(run.optimizer)
            dispatch_clip_grad(run.model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.step += 1
        run.scheduler.step_update(run.step)
        if run.ema is not None:
            run.ema.update(unwrap_model(run.model), step=run.step)

        # Running sums stay on the device; only the progress bar refresh synchronises.
        batches += 1
        step_stats = {"batches": torch.ones((), device=device), "loss": loss.detach()}
        for reg in run.regularizers:
            for key, value in reg.stats().items():
                if isinstance(value, Tensor):
                    step_stats[key] = value
                else:
                    current[key] = value
        for key, value in step_stats.items():
            sums[key] = sums.get(key, 0.0) + value.double()
        if batches % cfg.log_every == 0 and run.info.is_main:
            rate = batches * images.shape[0] * run.info.world_size
            rate /= time.perf_counter() - start_time
            count = sums["batches"].item()
            shown = {k: f"{v.item() / count:.4f}" for k, v in sums.items() if k != "batches"}
            progress.set_postfix(shown | {"img/s": f"{rate:.0f}"}, refresh=False)
        if on_step is not None:
            on_step(epoch, batch + 1)
        if run.step >= run.total_steps:
            break
    progress.close()

    elapsed = time.perf_counter() - start_time
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


def build_training_run(
    cfg: TrainConfig,
    info: DistributedInfo,
    num_classes: int,
    in_chans: int,
    steps_per_epoch: int,
    checkpoint: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
) -> TrainingRun:
    """Model (DDP-wrapped under torchrun), optimiser, schedule, scaler, EMA, regularisers and
    loss of a run, restored from ``checkpoint`` (weights, state) if given (RNGs excepted)."""
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model, num_classes=num_classes, img_size=cfg.image_size(), in_chans=in_chans,
        drop_path_rate=cfg.drop_path, no_last_skip=cfg.no_last_skip, checkpoint=cfg.checkpoint,
        **cfg.model_kwargs,
    ).to(info.device)  # fmt: skip
    optimizer = create_optimizer_v2(
        model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    amp_dtype = autocast_dtype(cfg.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype == torch.float16)
    state: dict[str, Any] = {"step": 0}
    if checkpoint is not None:
        weights, state = checkpoint
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    # EMA copies the model after DDP's broadcast and before the regularisers' hooks.
    ema = ModelEmaV3(unwrap_model(model), decay=cfg.model_ema_decay) if cfg.model_ema else None
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    regularizers = build_regularizers(cfg)
    for reg in regularizers:
        reg.attach(model)
    criterion, mixup = _criterion(cfg, num_classes)
    return TrainingRun(
        cfg, info, model, optimizer, scheduler, scaler, criterion, regularizers, mixup, ema,
        amp_dtype, steps_per_epoch, total_steps, step=state["step"],
    )  # fmt: skip


class RunLog:
    """Per-epoch rows in ``log.csv`` (and TensorBoard if installed); main process only."""

    def __init__(self, run_dir: Path, enabled: bool, first_epoch: int) -> None:
        self.path = RunPaths(run_dir).log
        self.enabled = enabled
        self.tensorboard = None
        if not enabled:
            return
        # Rows of epochs that will run again (after a resume) are dropped.
        self.rows: list[dict[str, str]] = []
        if self.path.exists() and first_epoch > 0:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < first_epoch]
        self._write()
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
    datasets: tuple[Dataset, Dataset] | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says and write the run to ``run_dir``; return the final metrics.

    ``run_dir`` receives ``config.yaml``, ``log.csv``, ``checkpoints/``, and at the end
    ``model.safetensors`` (the trained weights; ``model_ema.safetensors`` too with EMA) and
    ``metrics.json``. With ``resume``, training continues from the latest checkpoint (mid-epoch
    included), reproducing the uninterrupted run bit for bit. ``datasets`` replaces
    ``(train, val)`` built from the config; each needs ``num_classes`` and ``in_chans``.

    Under torchrun, every process calls this; only rank 0 writes files.
    """
    info = init_distributed(config.device)
    try:
        return _train(config, Path(run_dir), info, resume, datasets)
    finally:
        cleanup_distributed()


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    info: DistributedInfo,
    resume: bool,
    datasets: tuple[Dataset, Dataset] | None,
) -> dict[str, Any]:
    paths = RunPaths(run_dir)
    checkpoint_dir = paths.checkpoints
    stem = latest_checkpoint(checkpoint_dir) if checkpoint_dir.exists() else None
    if stem is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, "
            "or choose another --output"
        )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, paths.config)

    train_set, val_set = datasets if datasets is not None else build_datasets(cfg, info)
    train_loader = build_train_loader(
        train_set, cfg.batch_size, info, seed=cfg.seed, num_workers=cfg.num_workers
    )
    val_loader = build_eval_loader(val_set, cfg.batch_size, info, num_workers=cfg.num_workers)
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "elapsed": 0.0, "best": {}}
    loaded = None
    if stem is not None:
        loaded = load_checkpoint(stem)
        state = loaded[1]
        if state["global_batch"] != cfg.batch_size * info.world_size:
            raise ValueError(
                f"{stem} was written with a global batch of {state['global_batch']}; "
                f"this run has {cfg.batch_size} x {info.world_size} processes"
            )
    steps_per_epoch = len(train_loader)
    run = build_training_run(
        cfg, info, train_set.num_classes, train_set.in_chans, steps_per_epoch, loaded
    )
    # Training randomness (dropout, drop path, Mixup) differs per rank, as in DeiT.
    random_seed(cfg.seed, info.rank)
    if stem is not None:
        own = state["ranks"][info.rank]
        set_rng_state(own["rng"])
        run.epoch_sums = {k: v.to(info.device) for k, v in own["epoch_sums"].items()}
        if info.is_main:
            print(f"resumed from {stem} (epoch {state['epoch']}, step {state['step']})")

    best: dict[str, Any] = state["best"]
    elapsed, session_start = state["elapsed"], time.perf_counter()

    def save(epoch: int, batch: int) -> None:
        # Collective: every rank contributes its RNG states and epoch sums, rank 0 writes.
        ranks = all_gather_object(
            {"rng": get_rng_state(), "epoch_sums": {k: v.cpu() for k, v in run.epoch_sums.items()}}
        )
        if not info.is_main:
            return
        payload = {
            "epoch": epoch, "batch": batch, "step": run.step, "best": best,
            "elapsed": elapsed + time.perf_counter() - session_start,
            "global_batch": cfg.batch_size * info.world_size,
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "ranks": ranks,
            "ema": None if run.ema is None else run.ema.state_dict(),
        }  # fmt: skip
        save_checkpoint(
            checkpoint_dir, run.step, unwrap_model(run.model), payload, cfg.keep_checkpoints
        )

    def on_step(epoch: int, batch: int) -> None:
        every = cfg.checkpoint_every
        if every and run.step % every == 0 and batch < run.steps_per_epoch:
            save(epoch, batch)

    log = RunLog(run_dir, info.is_main, state["epoch"])
    start_batch, val, train_stats = state["batch"], None, {}
    for epoch in range(state["epoch"], cfg.epochs):
        if run.step >= run.total_steps:
            break
        train_loader.sampler.set_position(epoch, start_batch)
        train_stats = train_one_epoch(run, train_loader, epoch, start_batch, on_step)
        done = run.step >= run.total_steps or epoch + 1 == cfg.epochs
        batches = run.step - epoch * run.steps_per_epoch
        val = None
        if done or (epoch + 1) % cfg.eval_every == 0:
            val = _evaluate_all(run, val_loader)
            if val["top1"] > best.get("top1", -1.0):
                best = {"top1": val["top1"], "epoch": epoch, "step": run.step}
        row = {"epoch": epoch, "step": run.step, **train_stats, **_prefixed(val, "val_")}
        if run.ema is not None:
            ema_val = None if val is None else {k[4:]: v for k, v in val.items() if k[:4] == "ema_"}
            row |= _prefixed(ema_val, "val_ema_")
        log.append(row)
        # A max_steps stop mid-epoch is a position that a longer run can resume from.
        if batches == run.steps_per_epoch:
            save(epoch + 1, 0)
        else:
            save(epoch, batches)
        start_batch = 0
    log.close()

    if val is None:  # the run had already finished when it was resumed
        val = _evaluate_all(run, val_loader)
    elapsed += time.perf_counter() - session_start
    metrics = {
        **{k: v for k, v in val.items() if not k.startswith("ema_")},
        "best_top1": best.get("top1"), "best_epoch": best.get("epoch"),
        "steps": run.step, "epochs": cfg.epochs, "train_time_s": elapsed,
        **{k: v for k, v in train_stats.items() if k.startswith("train_") or k == "images_per_s"},
        **({"ema": {k[4:]: v for k, v in val.items() if k.startswith("ema_")}} if run.ema else {}),
    }  # fmt: skip
    if info.is_main:
        save_weights(unwrap_model(run.model), paths.weights)
        if run.ema is not None:
            save_weights(run.ema.module, paths.ema_weights)
        atomic_write(paths.metrics, json.dumps(metrics, indent=2).encode())
    for reg in run.regularizers:
        reg.remove()
    return metrics


def _prefixed(metrics: dict[str, float] | None, prefix: str) -> dict[str, float | None]:
    keys = ("top1", "top5", "loss", *ATTENTION_KEYS)
    return {f"{prefix}{k}": None if metrics is None else metrics.get(k) for k in keys}


def _evaluate_all(run: TrainingRun, loader: DataLoader) -> dict[str, float]:
    # The bare model: ranks may hold shards of different lengths, and DDP's forward may sync.
    model = unwrap_model(run.model)
    device, attention = run.info.device, _has_cls_attention(model)
    metrics = _evaluate_for_log(model, loader, device, run.amp_dtype, attention)
    if run.ema is not None:
        ema_metrics = _evaluate_for_log(run.ema.module, loader, device, run.amp_dtype, attention)
        metrics |= {f"ema_{k}": v for k, v in ema_metrics.items()}
    return metrics


def _evaluate_for_log(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    attention: bool,
) -> dict[str, float]:
    """Accuracy and, for a model with [CLS] attention, the :data:`ATTENTION_KEYS`."""
    metrics = evaluate(model, loader, device, amp_dtype, attention=attention)
    return {k: v for k, v in metrics.items() if k in ("top1", "top5", "loss", "images")
            or k in ATTENTION_KEYS}  # fmt: skip
