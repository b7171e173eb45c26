"""spatial-entropy: a spatial-entropy regulariser for Vision Transformers, on top of timm.

The public names below load on first use (a module ``__getattr__``, PEP 562), so that
``import spatial_entropy`` and the command line's ``--help`` stay cheap: torch, timm, scipy
and scikit-image are imported by the submodule that needs them, when a name from it is asked
for. ``from spatial_entropy import spatial_entropy`` works as with eager imports.

The ``reference_*`` functions are public on purpose: they are the slow, per-map oracles
(a Python loop around scipy's labeller, as in the authors' code) that the tests pin the fast
paths against, and a user who changes a grid, a backend or a dtype can check a result
against them the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

# The one place that states the version: pyproject.toml reads it from here.
__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "AttentionCapture": "attention",
    "unwrap_model": "attention",
    "label_components": "components",
    "reference_label_components": "components",
    "TrainConfig": "config",
    "load_config": "config",
    "DatasetError": "data",
    "build_dataset": "data",
    "dataset_names": "data",
    "generate_cluttered": "data",
    "stratified_subset": "data",
    "drloc_loss": "drloc",
    "train": "engine",
    "SpatialEntropyLoss": "entropy",
    "reference_spatial_entropy": "entropy",
    "se_weight": "entropy",
    "spatial_entropy": "entropy",
    "AttentionStatistics": "evaluation",
    "attention_jaccard": "evaluation",
    "attention_masks": "evaluation",
    "evaluate": "evaluation",
    "evaluate_attention": "evaluation",
    "evaluate_run": "evaluation",
    "map_statistics": "evaluation",
    "create_model": "models",
    "load_checkpoint_into": "models",
    "remove_last_skip": "models",
    "DRLocRegularizer": "regularizers",
    "Regularizer": "regularizers",
    "SpatialEntropyRegularizer": "regularizers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'spatial_entropy' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"spatial_entropy.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
