"""Training configuration: a typed dataclass read from YAML and overridden by ``key=value``."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from spatial_entropy.choices import AMP_MODES, COMPILE_MODES, DATA_ON_DEVICE, DEVICES, SCHEDULES

__all__ = [
    "DRLocConfig",
    "SpatialEntropyConfig",
    "TrainConfig",
    "load_config",
    "save_config",
    "config_keys",
    "parse_override",
    "RESUMABLE_KEYS",
    "config_changes",
]


@dataclass
class SpatialEntropyConfig:
    """The spatial-entropy regulariser: ``total loss = task loss + weight(t) * SE``."""

    weight: float = 0.01  # peak lambda; 0 turns the regulariser off (no hooks, no cost)
    schedule: str = "warmup_cosine"  # "constant" or "warmup_cosine"
    warmup_epochs: float = 10.0  # linear warm-up of lambda (warmup_cosine only)
    per_step: bool = True  # update lambda every optimiser step (else once per epoch)


# Allowed values of numeric keys, as (low, high): a number is inclusive, a one-item tuple
# exclusive, None unbounded; every value must also be finite. `None` values (null) pass.
_RANGES: dict[str, tuple[Any, Any]] = {
    "img_size": (1, None),
    "drop_path": (0, (1,)),
    "n_per_class": (1, None),
    "fraction": ((0,), 1),
    "val_fraction": ((0,), 1),
    "num_workers": (0, None),
    "epochs": (1, None),
    "max_steps": (1, None),
    "batch_size": (1, None),
    "lr": (0, None),  # 0 freezes the weights (a test of loading, a probe)
    "weight_decay": (0, None),
    "layer_decay": ((0,), 1),
    "warmup_epochs": (0, None),
    "warmup_lr": (0, None),
    "min_lr": (0, None),
    "clip_grad": ((0,), None),
    "reprob": (0, 1),
    "mixup": (0, None),
    "cutmix": (0, None),
    "mixup_prob": (0, 1),
    "mixup_switch_prob": (0, 1),
    "smoothing": (0, (1,)),
    "model_ema_decay": (0, 1),
    "se.weight": (0, None),
    "se.warmup_epochs": (0, None),
    "checkpoint_every": (0, None),
    "checkpoint_epochs": (1, None),
    "keep_checkpoints": (1, None),
    "eval_every": (1, None),
    "log_every": (1, None),
}


def _in_range(value: float, low: Any, high: Any) -> bool:
    if not math.isfinite(value):
        return False
    above = low is None or (value > low[0] if isinstance(low, tuple) else value >= low)
    below = high is None or (value < high[0] if isinstance(high, tuple) else value <= high)
    return above and below


def _describe(low: Any, high: Any) -> str:
    """``(0,), 1`` -> '> 0 and <= 1' (inf and nan are outside every range)."""
    bounds = []
    if low is not None:
        bounds.append(f"> {low[0]}" if isinstance(low, tuple) else f">= {low}")
    if high is not None:
        bounds.append(f"< {high[0]}" if isinstance(high, tuple) else f"<= {high}")
    return " and ".join(bounds)


@dataclass
class DRLocConfig:
    """The DRLoc regulariser (Liu et al. 2021): ``total loss = task loss + weight * DRLoc``."""

    weight: float = 0.0  # constant lambda; 0 turns it off (reference: 0.1 T2T/CvT, 0.5 Swin)
    pairs: int = 64  # position pairs sampled per image
    hidden: int = 512  # width of the localisation MLP's two hidden layers

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"config key 'drloc.weight' must be >= 0, got {self.weight}")
        for key, value in {"drloc.pairs": self.pairs, "drloc.hidden": self.hidden}.items():
            if value < 1:
                raise ValueError(f"config key {key!r} must be >= 1, got {value}")


@dataclass
class TrainConfig:
    """Everything one training run needs; saved as ``RUN_DIR/config.yaml``.

    The recipe defaults are DeiT's (AdamW, cosine with warm-up, RandAugment, Mixup/CutMix,
    label smoothing, random erasing, drop path); ``configs/`` holds presets.
    """

    # model
    model: str = "se_vit_small_patch8_64"
    checkpoint: str | None = None  # fine-tune from our weights or a timm/DeiT state dict
    img_size: int | None = None  # None: the model's default input size
    no_last_skip: bool = False
    drop_path: float = 0.1
    model_kwargs: dict = field(default_factory=dict)  # more timm kwargs (depth, qk_norm, ...)
    # data
    dataset: str = "cluttered-fashion"
    data_path: str | None = None
    n_per_class: int | None = None
    fraction: float | None = None
    val_split: str = "test"  # evaluated during training
    val_fraction: float | None = None  # evaluate on a stratified subset (quick runs)
    data_options: dict = field(default_factory=dict)  # dataset-specific, passed through
    augment: dict = field(default_factory=dict)  # more transform keys (hflip, padding, ...)
    num_workers: int = 2
    data_on_device: str = "auto"  # "auto": small pad-crop-flip datasets kept on the device
    # optimisation
    epochs: int = 100
    max_steps: int | None = None  # stop after this many optimiser steps (schedules keep `epochs`)
    batch_size: int = 64  # per process, as in DeiT/timm
    opt: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    layer_decay: float | None = None
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: float | None = None
    # augmentation and regularisation
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    se: SpatialEntropyConfig = field(default_factory=SpatialEntropyConfig)
    drloc: DRLocConfig = field(default_factory=DRLocConfig)
    # runtime
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    amp: str = "auto"  # "auto" (bf16 on CUDA if supported, else fp16; off on CPU), "bf16", ...
    checkpoint_every: int = 500  # optimiser steps between checkpoints; 0: at epoch ends only
    checkpoint_epochs: int = 1  # epoch-end checkpoints after epochs 1, 1+N, 1+2N, ... and the last
    keep_checkpoints: int = 2
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    log_every: int = 10  # steps between progress-bar refreshes (each one syncs the device)
    compile: bool = False  # run the model through torch.compile (as timm's --torchcompile)
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": no code generation)
    compile_mode: str = "default"  # inductor's mode; "reduce-overhead": CUDA graphs

    def __post_init__(self) -> None:
        choices = {
            "se.schedule": (self.se.schedule, SCHEDULES),
            "amp": (self.amp, AMP_MODES),
            "device": (self.device, DEVICES),
            "compile_mode": (self.compile_mode, COMPILE_MODES),
            "data_on_device": (self.data_on_device, DATA_ON_DEVICE),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"config key {key!r} must be one of {allowed}, got {value!r}")
        for key, (low, high) in _RANGES.items():
            value = self
            for part in key.split("."):
                value = getattr(value, part)
            if value is not None and not _in_range(value, low, high):
                raise ValueError(f"config key {key!r} must be {_describe(low, high)}, got {value}")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ValueError(
                f"config key 'compile_mode' {self.compile_mode!r} needs compile_backend "
                f"'inductor' (got {self.compile_backend!r})"
            )
        if self.n_per_class is not None and self.fraction is not None:
            raise ValueError(
                f"config key 'fraction' cannot be set together with 'n_per_class' "
                f"(got fraction={self.fraction}, n_per_class={self.n_per_class}); give one"
            )

    def image_size(self) -> int | None:
        """Input side in pixels: ``img_size``, else the model's default input size from timm's
        pretrained config (None when it has none, leaving the model's own default).

        Raises:
            ValueError: timm knows no model ``model`` (the message suggests close names).
        """
        if self.img_size is not None:
            return self.img_size
        # Imported here so that reading a config (and `spatial-entropy --help`) skips timm;
        # importing our models also registers the presets that timm is asked about.
        from timm.models import get_pretrained_cfg_value

        from spatial_entropy.models import check_model_name

        check_model_name(self.model)

        input_size = get_pretrained_cfg_value(self.model, "input_size")
        return None if input_size is None else input_size[-1]


RESUMABLE_KEYS: tuple[str, ...] = (
    # The run's length. The schedules (learning rate, se.weight) are functions of `epochs`:
    # a longer `epochs` makes them follow the longer run from the resumed step on; `max_steps`
    # leaves them as they are (an exact continuation).
    "epochs",
    "max_steps",
    # Where the same data lie (e.g. a copy on a node's local disk).
    "data_path",
    # How the run is carried out, not what it computes (resume stays exact with any of these,
    # on the same device type).
    "num_workers",
    "data_on_device",
    "device",
    "compile",
    "checkpoint_every",
    "checkpoint_epochs",
    "keep_checkpoints",
    "eval_every",
    "log_every",
)
"""The config keys that a resumed run may change; every other key must keep its value."""


def config_changes(saved: TrainConfig, requested: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, requested value)}`` for the keys whose values differ."""
    before, after = _flatten(dataclasses.asdict(saved)), _flatten(dataclasses.asdict(requested))
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    }


def _fields(cls: type) -> dict[str, Any]:
    """Dotted key -> type for every leaf field of a (nested) config dataclass."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= {f"{f.name}.{k}": t for k, t in _fields(hints[f.name]).items()}
        else:
            keys[f.name] = hints[f.name]
    return keys


def config_keys() -> list[str]:
    """All valid dotted keys of :class:`TrainConfig`."""
    return sorted(_fields(TrainConfig))


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        # Dict-valued fields (`data_options`, `augment`) are leaves: their keys pass through.
        if isinstance(value, Mapping) and _fields(TrainConfig).get(dotted) is not dict:
            flat |= _flatten(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against the field's type; ints (and ``5e-4``) pass where floats are due."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    allowed = allowed or (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            # PyYAML reads `5e-4` (no dot in the mantissa) as a string; it means a float.
            with contextlib.suppress(ValueError):
                return float(value)
        if kind is not type(None) and isinstance(value, kind):
            if kind is int and isinstance(value, bool):
                continue
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ValueError(f"config key {key!r} expects {names}, got {value!r} ({type(value).__name__})")


def _unknown_key_error(key: str, valid: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")


def parse_override(item: str) -> tuple[str, Any]:
    """Split a ``key=value`` item into the key and its YAML-typed value (empty value: None)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects key=value, got {item!r}")
    # YAML typing: `lr=1e-3` is a float, `model_ema=true` a bool, `max_steps=null` None.
    try:
        return key.strip(), yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"--set {item!r}: invalid YAML value ({problem})") from exc


def _read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document at ``path``; a missing file or bad YAML is an error naming the file
    (and, for bad YAML, the line) in one line."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from exc


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build a :class:`TrainConfig` from defaults, a YAML file, ``values`` and ``key=value`` items.

    Later sources win: defaults < YAML file < ``values`` < ``overrides``. Nested YAML mappings and
    dotted keys (``se.weight``) are equivalent.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: invalid YAML, an unknown key (the message lists the valid ones), a value of
            the wrong type or out of range.
    """
    flat: dict[str, Any] = {}
    if path is not None:
        loaded = _read_yaml(path)
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a mapping of config keys, got {type(loaded)}")
        flat |= _flatten(loaded)
    flat |= _flatten(values or {})
    flat |= dict(parse_override(item) for item in overrides)

    types_by_key = _fields(TrainConfig)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in types_by_key:
            raise _unknown_key_error(key, sorted(types_by_key))
        *parents, leaf = key.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _coerce(key, value, types_by_key[key])
    se = SpatialEntropyConfig(**nested.pop("se", {}))
    drloc = DRLocConfig(**nested.pop("drloc", {}))
    return TrainConfig(**nested, se=se, drloc=drloc)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, readable back by :func:`load_config`."""
    with open(path, "w") as f:
        yaml.safe_dump(dataclasses.asdict(config), f, sort_keys=False)
