"""Runs trained as one vmapped group (spatial_entropy.grouped) against the same runs trained
alone by the engine: the oracle is the engine."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from spatial_entropy.checkpoint import load_weights
from spatial_entropy.config import load_config
from spatial_entropy.engine import train
from spatial_entropy.grouped import check_group, train_group
from spatial_entropy.runs import RunInUseError, RunPaths, training_lock

SE_ON = {"weight": 0.5, "schedule": "constant"}
DRLOC_ON = {"weight": 0.7, "pairs": 8, "hidden": 16}
# λ 0 in the first epoch (computed without a graph), then rising (per epoch here)
SE_WARMUP = {"weight": 0.5, "warmup_epochs": 1.0, "per_step": False}
ARMS = {
    "baseline": {"se": {"weight": 0.0}},
    "se": {"se": SE_WARMUP},
    "drloc": {"se": {"weight": 0.0}, "drloc": DRLOC_ON},
    "se_drloc": {"se": SE_ON, "drloc": DRLOC_ON},
}


@pytest.fixture
def recipe(tmp_path):
    """A two-block ViT on a few cluttered-fashion scenes, 3 epochs of 2 steps, evaluated after
    epochs 2 and 3, drop path on. SGD: its update is linear in the gradient, so the rounding
    of the batched products stays at rounding size (Adam's normalised step can turn a
    near-zero gradient's rounding into a full step of lr)."""
    cache = str(tmp_path / "data")
    return {
        "model": "se_vit_tiny_patch4_32", "img_size": 16, "dataset": "cluttered-fashion",
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
        "batch_size": 10, "epochs": 3, "eval_every": 2, "num_workers": 0, "drop_path": 0.1,
        "smoothing": 0.1, "opt": "sgd", "lr": 0.05, "weight_decay": 0.05,
        "mixup": 0.0, "cutmix": 0.0, "auto_augment": None, "reprob": 0.0,
        "data_options": {"train_per_class": 2, "test_size": 30, "cache_dir": cache},
    }  # fmt: skip


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# on the CPU vmap runs the fused kernel copy by copy, and says so each step
CPU_FUSED = pytest.param(
    True, marks=pytest.mark.filterwarnings("ignore:There is a performance drop because")
)


@pytest.mark.parametrize("fused_attention", [False, CPU_FUSED])
def test_each_copy_is_the_run_trained_alone(recipe, tmp_path, fused_attention):
    configs = {arm: load_config(values=recipe | keys) for arm, keys in ARMS.items()}
    grouped = train_group(list(configs.values()), [tmp_path / "g" / arm for arm in ARMS],
                          fused_attention=fused_attention)  # fmt: skip
    for (arm, config), metrics in zip(configs.items(), grouped, strict=True):
        alone = train(config, tmp_path / "alone" / arm)
        ours = load_weights(tmp_path / "g" / arm / "model.safetensors")
        theirs = load_weights(tmp_path / "alone" / arm / "model.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=arm + key)
        assert metrics["top1"] == alone["top1"] and metrics["steps"] == alone["steps"] == 6
        assert metrics["group"] == {"copies": 4, "index": list(ARMS).index(arm)}
        for key in ("train_loss", "train_se", "train_drloc", "loss", "se_mean"):
            assert (key in metrics) == (key in alone), (arm, key)
            if key in alone:
                assert metrics[key] == pytest.approx(alone[key], rel=1e-5), (arm, key)
        ours_log = _rows(tmp_path / "g" / arm / "log.csv")
        theirs_log = _rows(tmp_path / "alone" / arm / "log.csv")
        assert [list(r) for r in ours_log] == [list(r) for r in theirs_log]
        for mine, other in zip(ours_log, theirs_log, strict=True):
            for column in ("epoch", "step", "lr", "se_weight", "val_top1"):
                assert mine.get(column) == other.get(column), (arm, column)


def test_a_group_run_reads_as_finished(recipe, tmp_path):
    config = load_config(values=recipe | ARMS["se"] | {"epochs": 1})
    [metrics] = train_group([config], [tmp_path / "run"])
    again = train(config, tmp_path / "run", resume=True)  # no checkpoint: finished, not retrained
    assert again == json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_refusals_leave_runs_as_they_were(recipe, tmp_path):
    base = load_config(values=recipe)
    with pytest.raises(ValueError, match="differs from config 0 in lr"):
        check_group([base, load_config(values=recipe | {"lr": 0.1})])
    with pytest.raises(ValueError, match="model_ema"):
        check_group([load_config(values=recipe | {"model_ema": True})])
    with pytest.raises(ValueError, match="one distinct run directory per config"):
        train_group([base, base], [tmp_path / "a", tmp_path / "a"])
    one_epoch = load_config(values=recipe | {"epochs": 1})
    train_group([one_epoch], [tmp_path / "kept"])
    before = (tmp_path / "kept" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_group([one_epoch], [tmp_path / "kept"])
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == before
    with pytest.raises(ValueError, match="BatchNormAct2d layers"):  # the conv stem's
        stem = {"model": "se_vit_convstem_small_56", "model_kwargs": {}, "img_size": 56}
        train_group([load_config(values=recipe | stem)], [tmp_path / "stem"])
    assert not (tmp_path / "stem").exists()
    with pytest.raises(ValueError, match="not element-wise"):
        train_group([load_config(values=recipe | {"opt": "lamb"})], [tmp_path / "lamb"])
    assert not (tmp_path / "lamb").exists()


def test_a_group_whose_run_or_checkpoint_is_being_trained_is_refused(recipe, tmp_path):
    config = load_config(values=recipe | {"epochs": 1})
    ckpt = tmp_path / "group.pt"
    # another process training a run directory, or the group's checkpoint, holds its lock
    for busy, held in ((tmp_path / "b", RunPaths(tmp_path / "b").training_lock()),
                       (ckpt, training_lock(tmp_path / "group.pt.lock", ckpt))):  # fmt: skip
        with held, pytest.raises(RunInUseError, match=f"{busy} is being trained by another"):
            train_group([config, config], [tmp_path / "a", tmp_path / "b"], checkpoint=ckpt)
        # nothing written, no lock left: only the (empty) directory the first holder made
        assert [p.name for p in tmp_path.iterdir()] == ["b"] and not any((tmp_path / "b").iterdir())
    train_group([config], [tmp_path / "a"], checkpoint=ckpt)  # released: it trains
    assert {p.name for p in tmp_path.iterdir()} - {"data"} == {"a", "b", "group.pt"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused_attention", [False, True])
def test_cuda_group_step_synchronises_never(recipe, tmp_path, fused_attention) -> None:
    # and runs every op batched: vmap warns when it falls back to a loop over the copies
    import warnings

    from spatial_entropy.grouped import _build_copy, _Group

    cuda = recipe | {"device": "cuda", "opt": "adamw", "amp": "bf16"}
    configs = [load_config(values=cuda | keys) for keys in ARMS.values()]
    copies = [_build_copy(c, tmp_path / str(i), 10, 1, torch.device("cuda"))
              for i, c in enumerate(configs)]  # fmt: skip
    group = _Group(copies, 10, steps_per_epoch=4, fused_attention=fused_attention)
    images = torch.rand(10, 1, 16, 16, device="cuda")
    targets = torch.arange(10, device="cuda")
    group.train_step(images, targets, 0, 0, 4)  # first step: lazy state (AdamW's moments)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            group.train_step(images, targets, 0, 1, 4)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert syncs == []
    loops = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert loops == []
    assert all(torch.isfinite(c.sums["loss"]) for c in copies)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused_attention", [False, True])
def test_cuda_each_copy_is_the_run_trained_alone(
    recipe, tmp_path, monkeypatch, fused_attention
) -> None:
    # float32 throughout: cuDNN's default TF32 convolutions would round the patch embedding of
    # the grouped (vmapped) and the plain convolution differently at 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cuda = recipe | {"device": "cuda", "amp": "off"}
    configs = [load_config(values=cuda | keys) for keys in ARMS.values()]
    train_group(configs, [tmp_path / "g" / arm for arm in ARMS], fused_attention=fused_attention)
    for arm, config in zip(ARMS, configs, strict=True):
        train(config, tmp_path / "alone" / arm)
        ours = load_weights(tmp_path / "g" / arm / "model.safetensors")
        theirs = load_weights(tmp_path / "alone" / arm / "model.safetensors")
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=0, msg=arm + key)


def test_train_sweep_writes_one_run_per_combination(tmp_path, tiny_sets, capsys) -> None:
    from spatial_entropy.cli import main

    sweep = ["--sweep", "se.weight=0,0.5", "--sweep", "drloc.weight=0,0.7"]
    assert main(["train", "--output", str(tmp_path / "sweep"), *tiny_sets(), *sweep]) == 0
    names = {p.name for p in (tmp_path / "sweep").iterdir()} - {"group.pt"}  # its checkpoint
    assert names == {f"se.weight={a}_drloc.weight={b}" for a in ("0", "0.5") for b in ("0", "0.7")}
    for name in names:
        run = tmp_path / "sweep" / name
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["group"]["copies"] == 4 and metrics["steps"] == 3
        config = load_config(run / "config.yaml")
        weights = name.replace("se.weight=", "").split("_drloc.weight=")
        assert (config.se.weight, config.drloc.weight) == tuple(float(w) for w in weights)
    assert capsys.readouterr().out.count("-> ") == 4
    again = ["train", "--output", str(tmp_path / "sweep"), *tiny_sets(), *sweep]
    assert main(again) == 1  # holds the group: refused, left as it was
    assert "holds a group's checkpoint" in capsys.readouterr().err
    assert main([*again, "--resume", "auto"]) == 0
    assert "have finished; nothing to do" in capsys.readouterr().out
    # not a key of the group: one line, nothing written
    argv = ["train", "--output", str(tmp_path / "lr"), *tiny_sets(), "--sweep", "lr=0.1,0.2"]
    assert main(argv) == 1
    assert "se.* and drloc.* keys only" in capsys.readouterr().err
    assert not (tmp_path / "lr").exists()


def test_a_killed_group_resumes_from_its_checkpoint_bit_for_bit(recipe, tmp_path, monkeypatch):
    from spatial_entropy import grouped

    recipe = recipe | {"epochs": 4, "checkpoint_epochs": 2, "opt": "adamw", "lr": 1e-3}
    configs = [load_config(values=recipe | keys) for keys in ARMS.values()]
    names = list(ARMS)
    whole = train_group(configs, [tmp_path / "whole" / n for n in names],
                        checkpoint=tmp_path / "whole" / "group.pt")  # fmt: skip
    # killed in epoch 3 (step 7 of 8), after the checkpoint of epoch 2 (its first at epoch 0)
    step = grouped._Group.train_step

    def dying(self, *args):
        if self.step == 6:
            raise KeyboardInterrupt
        step(self, *args)

    dirs = [tmp_path / "cut" / n for n in names]
    monkeypatch.setattr(grouped._Group, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train_group(configs, dirs, checkpoint=tmp_path / "cut" / "group.pt")
    assert not any(d.exists() for d in dirs)  # nothing written but the group's checkpoint
    saved = (tmp_path / "cut" / "group.pt").read_bytes()
    with pytest.raises(FileExistsError, match="holds a group's checkpoint"):  # not lost
        train_group(configs, dirs, checkpoint=tmp_path / "cut" / "group.pt")
    assert (tmp_path / "cut" / "group.pt").read_bytes() == saved
    monkeypatch.setattr(grouped._Group, "train_step", step)
    resumed = train_group(configs, dirs, checkpoint=tmp_path / "cut" / "group.pt", resume=True)
    timing = ("epoch_time_s", "images_per_s", "train_time_s")
    for name, a, b in zip(names, whole, resumed, strict=True):
        ours = load_weights(tmp_path / "cut" / name / "model.safetensors")
        theirs = load_weights(tmp_path / "whole" / name / "model.safetensors")
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
        rows = [_rows(tmp_path / run / name / "log.csv") for run in ("whole", "cut")]
        assert [{k: v for k, v in r.items() if k not in timing} for r in rows[0]] == [
            {k: v for k, v in r.items() if k not in timing} for r in rows[1]
        ]
    # finished: left as it is; other configs: refused in one line
    again = train_group(configs, dirs, checkpoint=tmp_path / "cut" / "group.pt", resume=True)
    assert again == resumed
    other = [load_config(values=recipe | keys | {"epochs": 5}) for keys in ARMS.values()]
    with pytest.raises(ValueError, match="written for other configs"):
        train_group(other, [tmp_path / "x" / n for n in names],
                    checkpoint=tmp_path / "cut" / "group.pt", resume=True)  # fmt: skip
