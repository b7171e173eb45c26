"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_benchmark(name: str):
    """Import ``benchmarks/NAME.py`` (scripts, not a package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # spawned workers and pickling find it by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)`` imports ``benchmarks/NAME.py``."""
    return _load_benchmark


TINY_RUN = [
    "model=se_vit_tiny_patch4_32",
    "model_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "img_size=16",
    "dataset=cluttered-fashion",
    "batch_size=10",
    "epochs=2",
    "max_steps=3",  # stops in the middle of epoch 1
    "num_workers=0",
]


@pytest.fixture
def tiny_sets(tmp_path):
    """``tiny_sets(*items)``: the ``--set`` arguments of a 3-step run of a one-block ViT on a few
    cluttered-fashion scenes (generated into ``tmp_path``), then those of ``items``."""
    cache = f"data_options={{train_per_class: 2, test_size: 30, cache_dir: {tmp_path / 'data'}}}"

    def sets(*items: str) -> list[str]:
        return [arg for item in (*TINY_RUN, cache, *items) for arg in ("--set", item)]

    return sets
