"""Tests of the training engine's pieces: resumable sampling, the regulariser, evaluation,
the train/evaluate commands and fine-tuning."""

import csv
import json
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from spatial_entropy.attention import AttentionCapture
from spatial_entropy.cli import main
from spatial_entropy.config import load_config
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.engine import build_regularizers, evaluate, train
from spatial_entropy.entropy import reference_spatial_entropy, spatial_entropy
from spatial_entropy.loader import EpochSeededDataset, ResumableSampler, build_train_loader
from spatial_entropy.models import create_model
from spatial_entropy.regularizers import Regularizer, SpatialEntropyRegularizer


@pytest.mark.parametrize("rank", [0, 1])
def test_sampler_follows_distributed_sampler_and_resumes_mid_epoch(rank):
    data = list(range(22))
    sampler = ResumableSampler(data, batch_size=3, num_replicas=2, rank=rank, seed=5)
    oracle = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=5)
    oracle.set_epoch(4)
    sampler.set_position(4)
    assert list(sampler) == [(4, i) for i in oracle]
    sampler.set_position(4, batch=2)
    assert list(sampler) == [(4, i) for i in list(oracle)[6:]] and len(sampler) == 11 - 6


class _RandomPixel(Dataset):
    """Item i is one draw from each global RNG: what an augmentation would consume."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(()).item(), float(np.random.rand())  # noqa: NPY002


def test_augmentation_randomness_is_a_function_of_seed_epoch_and_index():
    dataset = EpochSeededDataset(_RandomPixel(), seed=3)
    torch.manual_seed(0)
    outer = torch.rand(3)
    torch.manual_seed(0)
    first = [dataset[(1, i)] for i in range(8)]
    assert torch.equal(torch.rand(3), outer), "items must not move the caller's RNG"
    assert [dataset[(1, i)] for i in reversed(range(8))] == first[::-1]
    assert dataset[(2, 0)] != first[0] and len(set(first)) == 8


def test_loader_batches_do_not_depend_on_workers():
    x = torch.arange(40.0)
    info = DistributedInfo()
    batches = [
        [b for (b,) in build_train_loader(TensorDataset(x), 4, info, seed=1, num_workers=n)]
        for n in (0, 2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*batches, strict=True)) and len(batches[0]) == 10


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
        num_classes=3,
    )  # fmt: skip


def test_spatial_entropy_regularizer_is_weighted_reference_entropy():
    model, regularizer = _tiny_vit(), SpatialEntropyRegularizer(0.5, "constant")
    assert isinstance(regularizer, Regularizer)
    regularizer.attach(model)
    regularizer.set_progress(3.0, 10.0)
    model(torch.randn(2, 3, 32, 32))
    with AttentionCapture(model) as capture:
        model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    term = regularizer()
    expected = reference_spatial_entropy(capture.logits, capture.grid_shape).mean()
    torch.testing.assert_close(term, 0.5 * expected)
    torch.testing.assert_close(regularizer.stats()["se"], expected.detach())
    assert term.requires_grad and regularizer.stats()["se_weight"] == 0.5
    regularizer.remove()


def test_regularizer_at_zero_weight_logs_without_a_graph():
    model, regularizer = _tiny_vit(), SpatialEntropyRegularizer(0.01, "warmup_cosine", warmup=2)
    regularizer.attach(model)
    regularizer.set_progress(0.0, 10.0)  # start of the warm-up: lambda = 0
    model(torch.randn(2, 3, 32, 32))
    term = regularizer()
    assert term.item() == 0 and not term.requires_grad
    assert regularizer.stats()["se"] >= 0


def test_regularizer_switches():
    assert build_regularizers(load_config(overrides=["se.weight=0"])) == []
    (se,) = build_regularizers(load_config(overrides=["se.weight=0.2", "se.warmup_epochs=3"]))
    assert (se.weight, se.schedule, se.warmup) == (0.2, "warmup_cosine", 3.0)


def test_evaluate_matches_a_numpy_oracle():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 7, generator=generator)
    targets = torch.randint(0, 7, (37,), generator=generator)
    loader = DataLoader(TensorDataset(logits, targets), batch_size=10)
    metrics = evaluate(nn.Identity(), loader, torch.device("cpu"))  # the "model" is its input

    scores, labels = logits.numpy(), targets.numpy()
    rank = (scores > scores[np.arange(37), labels][:, None]).sum(1)  # classes scored higher
    shifted = scores - scores.max(1, keepdims=True)
    nll = -(shifted[np.arange(37), labels] - np.log(np.exp(shifted).sum(1)))
    assert metrics["top1"] == pytest.approx(100 * np.mean(rank == 0))
    assert metrics["top5"] == pytest.approx(100 * np.mean(rank < 5))
    assert metrics["loss"] == pytest.approx(nll.mean(), rel=1e-6)
    assert metrics["images"] == 37


@pytest.mark.slow
def test_train_then_evaluate_commands(tmp_path, tiny_sets, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), *tiny_sets()]) == 0
    assert "top1" in capsys.readouterr().out
    for name in ("config.yaml", "log.csv", "metrics.json", "model.safetensors", "checkpoints"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["images"] == 30

    assert main(["evaluate", str(run), "--split", "test"]) == 0
    evaluated = json.loads((run / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out) == evaluated
    # the final weights on the same split: the training run's own final evaluation
    for key in ("top1", "top5", "loss"):
        assert evaluated[key] == pytest.approx(metrics[key], rel=1e-6), key

    (stem,) = sorted((run / "checkpoints").glob("step_*.pt"))[-1:]
    assert main(["evaluate", str(run), "--checkpoint", str(stem)]) == 0
    assert json.loads((run / "eval.json").read_text())["top1"] == pytest.approx(metrics["top1"])

    assert main(["train", "--output", str(run), *tiny_sets()]) == 1
    assert "--resume auto" in capsys.readouterr().err


def test_unknown_key_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path), "--set", "lrate=1"]) == 1
    error = capsys.readouterr().err
    assert re.search("unknown config key 'lrate'; valid keys: .* lr, ", error)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_checkpoint(tmp_path, tiny_sets):
    source = tmp_path / "source"
    assert main(["train", "--output", str(source), *tiny_sets()]) == 0
    # lr 0 and no weight decay: the fine-tuned weights are the loaded ones (new head aside)
    frozen = ["lr=0", "warmup_lr=0", "min_lr=0", "weight_decay=0", "mixup=0", "cutmix=0"]
    new_task = [f"checkpoint={source / 'model.safetensors'}", "img_size=32", "se.weight=0"]
    target = tmp_path / "target"
    assert main(["train", "--output", str(target), *tiny_sets(*frozen, *new_task)]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(target / "model.safetensors")
    assert after["pos_embed"].shape[1] == 1 + 8 * 8 and before["pos_embed"].shape[1] == 1 + 4 * 4
    grid = before["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True)
    torch.testing.assert_close(
        after["pos_embed"][:, 1:], resampled.permute(0, 2, 3, 1).reshape(1, 64, -1)
    )
    for key in before:
        if not key.startswith("pos_embed"):
            assert torch.equal(before[key], after[key]), key


def test_diverging_run_stops_with_a_clear_error(tmp_path, tiny_sets, capsys):
    # lr=inf is refused by the config; a finite but absurd one overflows the weights
    items = ["lr=1e30", "warmup_epochs=0", "mixup=0", "cutmix=0"]
    assert main(["train", "--output", str(tmp_path / "run"), *tiny_sets(*items)]) == 1
    assert "training loss is nan" in capsys.readouterr().err


class _Images(TensorDataset):
    num_classes, in_chans = 3, 1


def test_validation_spatial_entropy_is_logged_per_epoch(tmp_path):
    generator = torch.Generator().manual_seed(0)

    def images(n):
        return _Images(torch.randn(n, 1, 16, 16, generator=generator), torch.arange(n) % 3)

    val_set = images(7)  # batches of 4 and 3: a mean of batch means would be off
    model_kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    recipe = dict(epochs=2, batch_size=4, num_workers=0, mixup=0, cutmix=0, model_ema=True)
    vit = dict(model="se_vit_tiny_patch4_32", model_kwargs=model_kwargs, img_size=16)
    config = load_config(values=dict(model_ema_decay=0.5, se={"weight": 0.1}, **vit, **recipe))
    metrics = train(config, tmp_path, datasets=(images(8), val_set))

    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(row["val_se_mean"] and row["val_ema_se_mean"] for row in rows)
    for weights, prefix in (("model.safetensors", "val_"), ("model_ema.safetensors", "val_ema_")):
        model = create_model(
            config.model, num_classes=3, img_size=16, in_chans=1,
            checkpoint=tmp_path / weights, **model_kwargs,
        ).eval()  # fmt: skip
        with torch.no_grad(), AttentionCapture(model) as capture:
            model(val_set.tensors[0])
        expected = spatial_entropy(capture.logits, capture.grid_shape).mean().item()
        assert float(rows[-1][f"{prefix}se_mean"]) == pytest.approx(expected, rel=1e-5), weights
        regions = float(rows[-1][f"{prefix}regions_mean"])
        share = float(rows[-1][f"{prefix}single_region_share"])
        assert regions >= 1 - share and 0 <= share <= 1
    assert metrics["se_mean"] == pytest.approx(float(rows[-1]["val_se_mean"]), rel=1e-9)
    assert json.loads((tmp_path / "metrics.json").read_text())["se_mean"] == metrics["se_mean"]


def test_resume_refusals_leave_the_run_as_it_was(tmp_path):
    data = _Images(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                   torch.arange(8) % 3)  # fmt: skip
    vit = dict(model="se_vit_tiny_patch4_32", img_size=16,
               model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})  # fmt: skip
    recipe = dict(epochs=1, batch_size=4, num_workers=0, mixup=0, cutmix=0, se={"weight": 0})
    train(load_config(values=vit | recipe), tmp_path, datasets=(data, data))
    written = (tmp_path / "config.yaml").read_text()

    with pytest.raises(FileExistsError, match="already holds a run"):
        train(load_config(values=vit | recipe), tmp_path, datasets=(data, data))
    other_batch = load_config(values=vit | recipe | {"batch_size": 2})
    with pytest.raises(ValueError, match="may change only .*'batch_size': 4 -> 2"):
        train(other_batch, tmp_path, resume=True, datasets=(data, data))
    assert (tmp_path / "config.yaml").read_text() == written


def test_checkpoint_epochs_saves_first_every_nth_and_last_epoch_and_resumes_between(tmp_path):
    data = _Images(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1)),
                   torch.arange(8) % 3)  # fmt: skip
    vit = dict(model="se_vit_tiny_patch4_32", img_size=16,
               model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})  # fmt: skip
    recipe = dict(epochs=5, batch_size=4, num_workers=0, mixup=0, cutmix=0, warmup_epochs=1,
                  checkpoint_every=0, checkpoint_epochs=3, keep_checkpoints=10,
                  se={"weight": 0.1, "warmup_epochs": 1})  # fmt: skip
    config = load_config(values=vit | recipe)
    whole = tmp_path / "whole"
    train(config, whole, datasets=(data, data))
    # 2 steps per epoch: saves after epochs 1, 4 and 5 (the last), not 2 and 3
    saved = sorted(path.name for path in (whole / "checkpoints").glob("step_*.pt"))
    assert saved == ["step_00000002.pt", "step_00000008.pt", "step_00000010.pt"]

    # What a kill after epoch 3 leaves: epoch 1's checkpoint and three logged epochs
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.yaml").write_text((whole / "config.yaml").read_text())
    log = (whole / "log.csv").read_text().splitlines()
    (killed / "log.csv").write_text("\n".join(log[:4]) + "\n")
    (killed / "checkpoints").mkdir()
    for suffix in (".pt", ".safetensors"):
        name = "step_00000002" + suffix
        (killed / "checkpoints" / name).write_bytes((whole / "checkpoints" / name).read_bytes())
    (killed / "checkpoints" / "latest").write_text("step_00000002")
    train(config, killed, resume=True, datasets=(data, data))

    def rows(run):
        with open(run / "log.csv", newline="") as f:
            timing = ("epoch_time_s", "images_per_s")
            return [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(f)]

    assert rows(killed) == rows(whole) and len(rows(whole)) == 5
    expected, resumed = (load_file(run / "model.safetensors") for run in (whole, killed))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
