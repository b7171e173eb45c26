"""The run directory: its file names, loading a run back, and the direction of imports."""

import ast
from pathlib import Path

import pytest
import torch

from spatial_entropy.checkpoint import save_weights
from spatial_entropy.config import load_config, save_config
from spatial_entropy.data import build_dataset
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.engine import build_datasets
from spatial_entropy.models import create_model
from spatial_entropy.runs import RunPaths, load_run

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spatial_entropy"


def test_run_paths_name_the_files_of_a_run():
    paths = RunPaths("runs/demo")
    assert paths == RunPaths(Path("runs/demo"))
    named = [paths.config, paths.weights, paths.ema_weights, paths.log, paths.metrics,
             paths.eval, paths.checkpoints, paths.tensorboard]  # fmt: skip
    assert [p.as_posix() for p in named] == [
        "runs/demo/config.yaml",
        "runs/demo/model.safetensors",
        "runs/demo/model_ema.safetensors",
        "runs/demo/log.csv",
        "runs/demo/metrics.json",
        "runs/demo/eval.json",
        "runs/demo/checkpoints",
        "runs/demo/tensorboard",
    ]


def _imported_modules(path: Path) -> set[str]:
    """Every module that ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", ["evaluation", "runs"])
def test_evaluation_and_runs_do_not_import_the_engine(module):
    imported = _imported_modules(PACKAGE / f"{module}.py")
    assert "spatial_entropy.engine" not in imported


def test_file_names_of_a_run_are_written_in_one_place():
    names = ("config.yaml", "model_ema.safetensors", "log.csv", "metrics.json", "eval.json")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "runs.py":
            continue
        code = [
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        # Docstrings and messages may mention a name; a path is never built from one.
        assert not [c for c in code if c in names], path


def test_load_run_loads_its_own_weights_strictly(tmp_path):
    config = load_config(
        values={
            "model": "se_vit_tiny_patch4_32",
            "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
            "dataset": "cluttered-fashion",
            "data_options": {"test_size": 2, "cache_dir": str(tmp_path / "cache")},
        }
    )
    save_config(config, tmp_path / "config.yaml")
    kwargs = dict(in_chans=1, **config.model_kwargs)
    torch.manual_seed(0)
    trained = create_model(config.model, num_classes=10, **kwargs)
    save_weights(trained, tmp_path / "model.safetensors")
    model, dataset, _ = load_run(tmp_path, with_masks=False)
    assert dataset.num_classes == 10
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    # Weights with another class count: an error, not a silently re-initialised head.
    other_task = create_model(config.model, num_classes=7, **kwargs)
    save_weights(other_task, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"10 classes.*head.weight: checkpoint \(7, 32\)"):
        load_run(tmp_path, with_masks=False)


@pytest.mark.parametrize("subset", [{"n_per_class": 2}, {"fraction": 0.5}])
def test_the_train_split_of_a_run_is_its_training_subset_without_augmentation(tmp_path, subset):
    options = {"train_per_class": 4, "test_size": 2, "cache_dir": str(tmp_path / "cache")}
    config = load_config(
        values={
            "model": "se_vit_tiny_patch4_32",
            "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
            "dataset": "cluttered-fashion",
            "data_options": options,
            "seed": 3,
            **subset,
        }
    )
    save_config(config, tmp_path / "config.yaml")
    model = create_model(config.model, num_classes=10, in_chans=1, **config.model_kwargs)
    save_weights(model, tmp_path / "model.safetensors")
    _, evaluated, _ = load_run(tmp_path, "train", with_masks=False)

    trained = build_datasets(config, DistributedInfo())[0]  # what training iterates over
    full = build_dataset(
        "cluttered-fashion", "train", img_size=config.image_size(), is_train=False, options=options
    )
    assert len(evaluated) == 20 and len(full) == 40  # 2 of the 4 images of each of 10 classes
    assert evaluated.indices == trained.indices
    assert sorted(evaluated.targets) == sorted(list(range(10)) * 2)
    for position in (0, 7, 19):  # the same images, with the evaluation transform
        image, label = evaluated[position]
        expected, expected_label = full[trained.indices[position]]
        assert label == expected_label and torch.equal(image, expected)
