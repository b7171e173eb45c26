"""Several runs of one model trained as one step: their parameters stacked, the model vmapped.

Runs that differ only in their regularisers' weights (the arms of one seed and size in a
benchmark: no regulariser, spatial entropy, DRLoc, both; or one λ against another) train the
same model on the same batches from the same initial weights. :func:`train_group` trains them
together: each parameter of the K runs is one stacked ``(K, ...)`` tensor, the model runs on the
shared batch once per copy through ``torch.func.vmap``, and one optimiser updates the stacked
tensors. Every kernel of a step then works for all K copies. On a GPU a step of a small ViT is
hundreds of kernels that take microseconds each. K copies in one kernel cost little more than
one, whereas K processes on one GPU take turns.

Each copy is written as a run of its own (``config.yaml``, ``log.csv``, ``model.safetensors``,
``metrics.json``, with ``metrics["group"]`` saying it was trained as a copy), which
:func:`~spatial_entropy.evaluation.evaluate_run`, the CLI's ``attention`` and ``train --resume``
(it reports the run finished) read like any run.

What a copy shares with the same config trained alone by :func:`~spatial_entropy.engine.train`:
initial weights (and DRLoc head), data order and augmentation, drop-path draws (vmap's
``randomness="same"``: one draw per step, the draw a run alone makes), DRLoc's position pairs,
the optimiser's update (element-wise on the stacked tensors; only element-wise optimisers are
accepted) and schedule. What differs is rounding: batched matrix products, and, by default,
the attention computed explicitly rather than by the fused kernel (vmap has no batching rule
for it on the CPU, where it runs copy by copy). ``fused_attention=True`` keeps the fused kernel,
which vmap batches in one call on CUDA (flash, memory-efficient and cuDNN attention). So a copy
is close to the run alone, not bit-equal (tested against the engine, both ways).

With a ``checkpoint`` file the group saves its whole state where a run alone would save
(``checkpoint_epochs``) and resumes from it bit for bit.

Not supported, refused in one line: configs that differ in anything but ``se.*`` and
``drloc.*``; torchrun; EMA; gradient clipping; layer decay; fp16 (bf16 and float32 are fine);
``compile``; optimisers that are not element-wise; models with BatchNorm (its running
statistics, e.g. in the convolutional stem). The run directories are written when the group
ends (without a ``checkpoint``, a killed group leaves no run behind and starts again).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import random_seed
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.data import Dataset
from tqdm import tqdm

from spatial_entropy.attention import AttentionCapture, num_prefix_tokens
from spatial_entropy.checkpoint import save_weights
from spatial_entropy.config import TrainConfig, config_changes, save_config
from spatial_entropy.distributed import DistributedInfo, resolve_device
from spatial_entropy.drloc import drloc_loss, sample_position_pairs
from spatial_entropy.engine import (
    RunLog,
    _criterion,
    _evaluate_for_log,
    _has_cls_attention,
    _prefixed,
    _scheduler,
    autocast_dtype,
    build_datasets,
    build_loaders,
    build_optimizer,
    build_regularizers,
    check_recipe,
    initial_model,
)
from spatial_entropy.entropy import spatial_entropy
from spatial_entropy.files import atomic_write
from spatial_entropy.regularizers import DRLocRegularizer, SpatialEntropyRegularizer
from spatial_entropy.rng import get_rng_state, set_rng_state
from spatial_entropy.runs import RunPaths, training_lock, write_json

__all__ = ["train_group", "check_group", "GROUP_KEYS"]

GROUP_KEYS = ("se.", "drloc.")
"""Prefixes of the config keys in which the runs of a group may differ."""

ELEMENTWISE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
"""Optimisers whose update of a stacked tensor is each copy's own update."""


def check_group(configs: Sequence[TrainConfig]) -> None:
    """Refuse, in one line and before anything is built, configs that cannot train as a group.

    Raises:
        ValueError: no config; two configs that differ outside :data:`GROUP_KEYS`; a feature
            that groups do not support (EMA, clip_grad, layer_decay, fp16, compile, torchrun).
    """
    if not configs:
        raise ValueError("a group needs at least one config")
    first = configs[0]
    for i, other in enumerate(configs[1:], start=1):
        fixed = [k for k in config_changes(first, other) if not k.startswith(GROUP_KEYS)]
        if fixed:
            raise ValueError(
                f"the runs of a group may differ only in se.* and drloc.*; config {i} differs "
                f"from config 0 in {', '.join(fixed)}"
            )
    unsupported = {
        "model_ema": first.model_ema, "clip_grad": first.clip_grad is not None,
        "layer_decay": first.layer_decay is not None, "amp=fp16": first.amp == "fp16",
        "compile": first.compile,
    }  # fmt: skip
    refused = [name for name, on in unsupported.items() if on]
    if refused:
        raise ValueError(f"a group does not support {', '.join(refused)}; train these runs alone")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("a group trains in one process; run it without torchrun")


@dataclass
class _Copy:
    """One run of the group: its config, its model (for evaluation and saving), its
    regularisers' settings, DRLoc's sampling stream and head, and its epoch sums and log."""

    config: TrainConfig
    paths: RunPaths
    model: nn.Module
    se: SpatialEntropyRegularizer | None
    drloc: DRLocRegularizer | None
    generator: torch.Generator | None = None
    sums: dict[str, Tensor] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)


class _LogitsAndTokens(nn.Module):
    """The ViT's logits and its final-norm tokens (DRLoc's input) from one forward pass."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.vit.forward_features(images)
        return self.vit.forward_head(tokens), tokens


def _stack(modules: Sequence[nn.Module], prefix: str = "") -> dict[str, Tensor]:
    """``{prefix + name: (K, ...) leaf}`` of the modules' parameters, stacked."""
    names = [name for name, _ in modules[0].named_parameters()]
    return {
        prefix + name: torch.stack([m.get_parameter(name).detach() for m in modules])
        .clone()
        .requires_grad_()
        for name in names
    }


def _skeleton(module: nn.Module, fused_attention: bool = False) -> nn.Module:
    """A parameter-free copy of ``module`` (on the meta device) for ``functional_call``, with
    explicit attention (vmap batches it on every device) unless ``fused_attention``."""
    skeleton = copy.deepcopy(module).to("meta")
    for sub in skeleton.modules():
        if hasattr(sub, "fused_attn"):
            sub.fused_attn = fused_attention
    return skeleton


def _optimizer(
    cfg: TrainConfig, copies: list[_Copy], stacked: dict[str, Tensor]
) -> torch.optim.Optimizer:
    """The optimiser that the engine builds for a run alone (`build_optimizer`: timm's groups,
    then the DRLoc head's), over the stacked tensors instead of one copy's parameters.

    Raises:
        ValueError: the optimiser is not element-wise (LAMB, LARS... scale by a tensor's norm,
            which a stacked tensor would mix between copies).
    """
    model = copies[0].model
    heads = [c.drloc.module for c in copies if c.drloc is not None][:1]
    names = {id(p): name for name, p in model.named_parameters()}
    names |= {id(p): "drloc." + name for head in heads for name, p in head.named_parameters()}
    optimizer = build_optimizer(cfg, model, heads)
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        raise ValueError(
            f"opt {cfg.opt!r} ({type(optimizer).__name__}) is not element-wise; a group "
            "supports " + ", ".join(t.__name__ for t in ELEMENTWISE_OPTIMIZERS)
        )
    groups = [
        {**group, "params": [stacked[names[id(p)]] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    accepted = inspect.signature(type(optimizer)).parameters
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


class _Group:
    """The stacked state of the copies and the vmapped step."""

    def __init__(
        self,
        copies: list[_Copy],
        num_classes: int,
        steps_per_epoch: int,
        fused_attention: bool = False,
    ) -> None:
        self.copies = copies
        cfg = copies[0].config
        norms = [
            type(m).__name__
            for m in copies[0].model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        if norms:
            raise ValueError(
                f"{cfg.model} has {norms[0]} layers, whose running statistics vmap cannot "
                "update per copy; train its runs alone"
            )
        self.device = next(copies[0].model.parameters()).device
        self.params = _stack([c.model for c in copies], prefix="vit.")
        self.buffers = {
            "vit." + name: torch.stack([c.model.get_buffer(name) for c in copies])
            for name, _ in copies[0].model.named_buffers()
        }
        self.skeleton = _LogitsAndTokens(_skeleton(copies[0].model, fused_attention)).train()
        with_cls = _has_cls_attention(copies[0].model)
        self.capture = AttentionCapture(self.skeleton.vit) if with_cls else None
        self.with_se = [i for i, c in enumerate(copies) if c.se is not None]
        self.with_drloc = [i for i, c in enumerate(copies) if c.drloc is not None]
        # index tensors made once: a host-to-device copy in the step would wait for the GPU
        self.se_index = torch.tensor(self.with_se, device=self.device)
        self.drloc_index = torch.tensor(self.with_drloc, device=self.device)
        heads = [copies[i].drloc.module for i in self.with_drloc]
        self.head_params = _stack(heads) if heads else {}
        self.head_skeleton = _skeleton(heads[0]) if heads else None
        stacked = {k.removeprefix("vit."): v for k, v in self.params.items()}
        stacked |= {"drloc." + k: v for k, v in self.head_params.items()}
        self.optimizer = _optimizer(cfg, copies, stacked)
        self.scheduler = _scheduler(cfg, self.optimizer, steps_per_epoch)
        self.criterion, self.mixup = _criterion(cfg, num_classes)
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        self.step = 0
        for c in copies:
            if c.drloc is not None:
                c.generator = torch.Generator(device=self.device).manual_seed(c.drloc.seed)

    def _forward(self, params: dict, buffers: dict, images: Tensor):
        logits, tokens = functional_call(self.skeleton, (params, buffers), (images,))
        scores = self.capture.logits if self.capture is not None else logits.new_zeros(())
        return logits, tokens, scores

    def train_step(self, images: Tensor, targets: Tensor, epoch: int, batch: int, spe: int):
        """One optimiser step of every copy on the shared batch; each copy's statistics are
        added to its epoch sums."""
        copies = self.copies
        se_weights = []
        for i in self.with_se:
            c = copies[i]
            t = epoch + batch / spe if c.config.se.per_step else float(epoch)
            c.se.set_progress(t, c.config.epochs)
            se_weights.append(c.se.current_weight)
        grid = tuple(self.skeleton.vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
        enabled = self.amp_dtype is not None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled):
            forward = vmap(self._forward, in_dims=(0, 0, None), randomness="same")
            logits, tokens, scores = forward(self.params, self.buffers, images)
            task = vmap(self.criterion, in_dims=(0, None))(logits, targets)
            total = task.sum()
            stats = [{"loss": value} for value in task.detach()]  # per copy
            if self.with_se:
                total = total + self._se_term(scores, grid, se_weights, stats)
            if self.with_drloc:
                total = total + self._drloc_term(tokens, grid, stats)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.step += 1
        self.scheduler.step_update(self.step)
        for i, c in enumerate(copies):
            stats[i]["batches"] = torch.ones((), device=self.device)
            for key, value in stats[i].items():
                c.sums[key] = c.sums.get(key, 0.0) + value.double()

    def _se_term(
        self, scores: Tensor, grid: tuple[int, int], weights: list[float], stats: list[dict]
    ) -> Tensor:
        """``sum_k λ_k SE_k`` over the copies with spatial entropy (the SE of all their maps in
        one call); without a graph while every λ is 0, as the regulariser does alone."""
        maps = scores[self.se_index]  # (Ks, B, heads, N)
        with torch.set_grad_enabled(any(w > 0 for w in weights)):
            values = spatial_entropy(maps.flatten(0, 1), grid).reshape(len(maps), -1).mean(1)
        for j, i in enumerate(self.with_se):
            stats[i]["se"] = values[j].detach()
        if not values.requires_grad:
            return values.new_zeros(())
        return sum(w * values[j] for j, w in enumerate(weights))  # float weights: no copy

    def _drloc_term(self, tokens: Tensor, grid: tuple[int, int], stats: list[dict]) -> Tensor:
        """``sum_k w_k DRLoc_k`` over the copies with DRLoc, each with its own head and pairs."""
        copies = [self.copies[i] for i in self.with_drloc]
        prefix = num_prefix_tokens(self.skeleton.vit)
        patch_tokens = tokens[self.drloc_index][:, :, prefix:]  # (Kd, B, N, D)
        batch = patch_tokens.shape[1]
        positions = torch.stack([
            sample_position_pairs(batch, grid, c.drloc.pairs, c.generator) for c in copies
        ])  # fmt: skip

        def loss(head_params: dict, tokens: Tensor, pairs: Tensor) -> Tensor:
            def head(x: Tensor) -> Tensor:
                return functional_call(self.head_skeleton, head_params, (x,))

            return drloc_loss(tokens, grid, head, pairs)

        values = vmap(loss)(self.head_params, patch_tokens, positions)
        for j, i in enumerate(self.with_drloc):
            stats[i]["drloc"] = values[j].detach()
        return sum(c.drloc.weight * values[j] for j, c in enumerate(copies))

    def save(self, path: Path, epoch: int, elapsed: float, train_stats: list[dict]) -> None:
        """Write everything a resume at ``epoch`` (its start) needs, atomically."""
        state = {
            "configs": [dataclasses.asdict(c.config) for c in self.copies],
            "epoch": epoch, "step": self.step, "elapsed": elapsed, "train_stats": train_stats,
            "params": {k: v.detach() for k, v in self.params.items()},
            "head_params": {k: v.detach() for k, v in self.head_params.items()},
            "optimizer": self.optimizer.state_dict(), "rng": get_rng_state(),
            "generators": [None if c.generator is None else c.generator.get_state()
                           for c in self.copies],
            "copies": [{"rows": c.rows, "best": c.best} for c in self.copies],
        }  # fmt: skip
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, buffer.getvalue())

    def restore(self, state: dict[str, Any]) -> tuple[int, float, list[dict]]:
        """Continue from a :meth:`save`; returns (first epoch, elapsed s, last epoch's stats)."""
        with torch.no_grad():
            for stacked, saved in (("params", state["params"]),
                                   ("head_params", state["head_params"])):  # fmt: skip
                for name, tensor in getattr(self, stacked).items():
                    tensor.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.scheduler.step_update(self.step)
        set_rng_state(state["rng"])
        for c, generator, saved in zip(self.copies, state["generators"], state["copies"],
                                       strict=True):  # fmt: skip
            if generator is not None:
                c.generator.set_state(generator)
            c.rows, c.best = saved["rows"], saved["best"]
        return state["epoch"], state["elapsed"], state["train_stats"]

    def load_copy(self, i: int) -> nn.Module:
        """Copy ``i``'s current weights into its model; returns the model."""
        c = self.copies[i]
        with torch.no_grad():
            for name, p in c.model.named_parameters():
                p.copy_(self.params["vit." + name][i])
            for name, b in c.model.named_buffers():
                b.copy_(self.buffers["vit." + name][i])
        return c.model


def _build_copy(
    cfg: TrainConfig, run_dir: Path, num_classes: int, in_chans: int, device: torch.device
) -> _Copy:
    """The copy's model and DRLoc head, drawn as :func:`~spatial_entropy.engine.train` draws
    them (the seed, the model, then the head from the global stream)."""
    model = initial_model(cfg, num_classes, in_chans, device)
    se = drloc = None
    for reg in build_regularizers(cfg):
        reg.attach(model)
        reg.remove()  # the copy's model is only evaluated; the group reads its own skeleton
        if isinstance(reg, SpatialEntropyRegularizer):
            se = reg
        else:
            drloc = reg
    return _Copy(cfg, RunPaths(run_dir), model, se, drloc)


def train_group(
    configs: Sequence[TrainConfig],
    run_dirs: Sequence[str | Path],
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    datasets: tuple[Dataset, Dataset] | None = None,
    fused_attention: bool = False,
) -> list[dict[str, Any]]:
    """Train the runs ``configs`` as one group (see the module) and write run ``k`` to
    ``run_dirs[k]``; return each run's final metrics (``metrics.json``).

    ``fused_attention``: attention by the fused kernel under vmap (one batched call on CUDA;
    copy by copy on the CPU) instead of explicitly; speed only, the copies stay the runs alone
    up to rounding (tested both ways).

    With ``checkpoint`` (a file), the group's whole state is written there, atomically, at the
    epochs where a run alone would save (``checkpoint_epochs``, and the last), and ``resume``
    continues from it bit for bit; a group whose runs are all written is then left as it is.
    ``datasets`` replaces ``(train, val)`` built from the first config, as in
    :func:`~spatial_entropy.engine.train`. The run directories are written when the group
    ends; a directory that already holds a run, or a ``checkpoint`` that exists, is refused
    unless ``overwrite`` or the group resumes from its checkpoint. While the group trains, its
    run directories and its checkpoint are held
    (:func:`~spatial_entropy.runs.training_lock`).

    Raises:
        ValueError: see :func:`check_group`; ``run_dirs`` not one per config, or repeated;
            ``resume`` from a checkpoint written for other configs.
        FileExistsError: a run directory holds a run or the checkpoint exists, and neither
            ``overwrite`` nor a resume.
        RunInUseError: another process trains one of those directories or the checkpoint.
        FloatingPointError: a copy's training or validation loss is not finite.
    """
    configs = list(configs)
    check_group(configs)
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) != len(configs) or len({d.resolve() for d in dirs}) != len(dirs):
        raise ValueError(f"a group needs one distinct run directory per config, got {dirs}")
    with contextlib.ExitStack() as stack:  # no other process trains these (training_lock)
        for path in dirs:
            stack.enter_context(RunPaths(path).training_lock())
        if checkpoint:
            stack.enter_context(training_lock(Path(f"{checkpoint}.lock"), Path(checkpoint)))
        return _train_group(configs, dirs, checkpoint, resume, overwrite, datasets,
                            fused_attention)  # fmt: skip


def _train_group(
    configs: list[TrainConfig],
    dirs: list[Path],
    checkpoint: str | Path | None,
    resume: bool,
    overwrite: bool,
    datasets: tuple[Dataset, Dataset] | None,
    fused_attention: bool,
) -> list[dict[str, Any]]:
    """:func:`train_group` once its directories are held."""
    state = _read_state(Path(checkpoint), configs) if resume and checkpoint else None
    finished = [json.loads(RunPaths(d).metrics.read_text()) for d in dirs
                if RunPaths(d).metrics.is_file() and RunPaths(d).weights.is_file()]  # fmt: skip
    if resume and len(finished) == len(dirs):
        print(f"the {len(dirs)} runs of this group have finished; nothing to do")
        return finished
    if checkpoint and Path(checkpoint).is_file() and not (resume or overwrite):
        raise FileExistsError(
            f"{checkpoint} holds a group's checkpoint; resume to continue it (--resume auto), "
            "overwrite to start again"
        )
    for path in dirs:
        if RunPaths(path).run_files() and not overwrite and state is None:
            raise FileExistsError(f"{path} already holds a run; pass overwrite to replace it")
    cfg = configs[0]
    check_recipe(cfg)
    info = DistributedInfo(device=resolve_device(cfg.device))
    train_set, val_set = datasets if datasets is not None else build_datasets(cfg, info)
    train_loader, val_loader = build_loaders(cfg, train_set, val_set, info)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    copies = [
        _build_copy(c, d, train_set.num_classes, train_set.in_chans, info.device)
        for c, d in zip(configs, dirs, strict=True)
    ]
    group = _Group(copies, train_set.num_classes, steps_per_epoch, fused_attention)
    random_seed(cfg.seed, 0)  # the training streams of a run alone, after its initial weights
    first_epoch, elapsed, train_stats = 0, 0.0, []
    if state is not None:
        first_epoch, elapsed, train_stats = group.restore(state)
        print(f"resumed the group from {checkpoint} (epoch {first_epoch}, step {group.step})")
    clock = time.perf_counter() - elapsed
    progress = tqdm(total=total_steps, initial=group.step, desc=f"{len(copies)} runs as one",
                    dynamic_ncols=True)  # fmt: skip
    vals: list[dict[str, float] | None] = [None] * len(copies)
    for epoch in range(first_epoch, cfg.epochs):
        if group.step >= total_steps:
            break
        batches, seconds = _train_epoch(group, train_loader, epoch, total_steps, progress)
        train_stats = [_epoch_stats(group, c, epoch, batches, seconds) for c in copies]
        done = group.step >= total_steps or epoch + 1 == cfg.epochs
        vals = _end_epoch(group, val_loader, epoch, train_stats,
                          evaluate=done or (epoch + 1) % cfg.eval_every == 0)  # fmt: skip
        if checkpoint is not None and (done or epoch % cfg.checkpoint_epochs == 0):
            group.save(Path(checkpoint), epoch + 1, time.perf_counter() - clock, train_stats)
    progress.close()
    elapsed = time.perf_counter() - clock
    return [
        _write_run(group, i, vals[i] or _evaluate(group, i, val_loader), train_stats[i], elapsed)
        for i in range(len(copies))
    ]


def _train_epoch(
    group: _Group, loader, epoch: int, total_steps: int, progress: tqdm
) -> tuple[int, float]:
    """Train the group on one epoch of ``loader`` (stopping at ``total_steps``); the number of
    batches and the seconds it took."""
    loader.sampler.set_position(epoch, 0)
    start, batches = time.perf_counter(), 0
    for c in group.copies:
        c.sums = {}
    for batch, (images, targets) in enumerate(loader):
        images = images.to(group.device, non_blocking=True)
        targets = targets.to(group.device, non_blocking=True)
        if group.mixup is not None:
            images, targets = group.mixup(images, targets)
        group.train_step(images, targets, epoch, batch, len(loader))
        batches += 1
        progress.update()
        if group.step >= total_steps:
            break
    return batches, time.perf_counter() - start


def _end_epoch(
    group: _Group, loader, epoch: int, train_stats: list[dict[str, float]], evaluate: bool
) -> list[dict[str, float] | None]:
    """Each copy's validation metrics at the end of ``epoch`` (None where not ``evaluate``),
    its best top-1 so far and its log row."""
    vals = [_evaluate(group, i, loader) if evaluate else None for i in range(len(group.copies))]
    for c, val, stats in zip(group.copies, vals, train_stats, strict=True):
        if val is not None and val["top1"] > c.best.get("top1", -1.0):
            c.best = {"top1": val["top1"], "epoch": epoch, "step": group.step}
        c.rows.append({"epoch": epoch, "step": group.step, **stats, **_prefixed(val, "val_")})
    return vals


def _read_state(path: Path, configs: list[TrainConfig]) -> dict[str, Any] | None:
    """The group state saved at ``path`` (None if there is none).

    Raises:
        ValueError: it was written for other configs (or is not a group state).
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file
        raise ValueError(f"{path} cannot be read as a group checkpoint: {error}") from None
    if state.get("configs") != [dataclasses.asdict(c) for c in configs]:
        raise ValueError(
            f"{path} was written for other configs; resume with the same configs (the same "
            "--config, --set and --sweep), or remove it to start again"
        )
    return state


def _epoch_stats(
    group: _Group, c: _Copy, epoch: int, batches: int, elapsed: float
) -> dict[str, float]:
    """The epoch's log columns as the engine writes them for a run alone."""
    sums = {k: float(v) for k, v in sorted(c.sums.items())}
    count = max(sums.pop("batches", 0.0), 1.0)
    stats = {f"train_{k}": v / count for k, v in sums.items()}
    if not math.isfinite(stats["train_loss"]):
        raise FloatingPointError(
            f"{c.paths.root}: training loss is {stats['train_loss']} in epoch {epoch} (step "
            f"{group.step}); lower lr or amp=off"
        )
    if c.se is not None:
        stats["se_weight"] = c.se.current_weight
    stats["lr"] = group.optimizer.param_groups[0]["lr"]
    stats["images_per_s"] = batches * c.config.batch_size / max(elapsed, 1e-9)
    stats["epoch_time_s"] = elapsed
    return stats


def _evaluate(group: _Group, i: int, loader) -> dict[str, float]:
    model = group.load_copy(i)
    attention = group.capture is not None
    metrics = _evaluate_for_log(model, loader, group.device, group.amp_dtype, attention)
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"{group.copies[i].paths.root}: validation loss is {metrics['loss']} at step "
            f"{group.step}; lower lr or amp=off"
        )
    return metrics


def _write_run(
    group: _Group, i: int, val: dict[str, float], train_stats: dict[str, float], elapsed: float
) -> dict[str, Any]:
    """Write copy ``i`` as a finished run (no checkpoint); its ``metrics.json``."""
    c = group.copies[i]
    paths = c.paths
    paths.remove_run()
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(c.config, paths.config)
    log = RunLog(paths.root, True, 0)
    for row in c.rows:
        log.append(row)
    log.close()
    save_weights(group.load_copy(i), paths.weights)
    metrics = {
        **val, "best_top1": c.best.get("top1"), "best_epoch": c.best.get("epoch"),
        "steps": group.step, "epochs": c.config.epochs, "train_time_s": elapsed,
        **{k: v for k, v in train_stats.items() if k.startswith("train_") or k == "images_per_s"},
        "group": {"copies": len(group.copies), "index": i},
    }  # fmt: skip
    write_json(paths.metrics, metrics)
    return metrics
