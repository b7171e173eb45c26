"""The allowed values of the string options, defined once.

The config, the command line's parser and the library check against these tuples. This module
imports nothing, so the parser and the config use it without loading torch.
"""

from __future__ import annotations

__all__ = ["AMP_MODES", "COMPILE_MODES", "DATA_ON_DEVICE", "DEVICES", "SCHEDULES", "SPLITS"]

SCHEDULES = ("constant", "warmup_cosine")
"""Schedules of the spatial-entropy weight λ(t), see ``entropy.se_weight``."""

AMP_MODES = ("auto", "bf16", "fp16", "off")
"""Mixed precision of training, see ``engine.autocast_dtype``."""

DEVICES = ("auto", "cpu", "cuda")
"""Where to run; ``"auto"`` is CUDA when available, see ``distributed.resolve_device``."""

DATA_ON_DEVICE = ("auto", "off")
"""``auto``: small-image datasets with pad-crop-flip alone are served from a copy on the device."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes (inductor): ``"reduce-overhead"`` replays CUDA graphs, which removes
the launch cost of a step of many small kernels; see ``models.compile_model``."""

SPLITS = ("train", "val", "test")
"""Dataset splits that every dataset answers to, see ``data.build_dataset``."""
