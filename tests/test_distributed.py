"""torchrun DDP on CPU (gloo, 2 processes) takes the same steps as one process with the same
global batch and data order, both regularisers on (DRLoc's head is synchronised too)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spatial_entropy.checkpoint import latest_checkpoint, load_checkpoint, save_weights
from spatial_entropy.config import load_config, save_config
from spatial_entropy.drloc import DRLocHead
from spatial_entropy.models import create_model
from spatial_entropy.runs import RunPaths

pytestmark = pytest.mark.slow

# Random augmentation stays on: it is seeded per sample, so it does not depend on the rank.
# Mixup and drop path draw from per-rank streams, so they are off. SGD, not AdamW: the key bias
# gets a zero gradient up to rounding (softmax is shift invariant), which Adam's normalisation
# would blow up to full-size steps, so AdamW runs agree only as well as their rounding noise.
TINY = [
    "model=se_vit_tiny_patch4_32",
    "model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "img_size=16",
    "dataset=fashion-mnist",
    "n_per_class=4",
    "val_fraction=0.01",
    "epochs=2",
    "opt=sgd",
    "lr=0.2",
    "max_steps=4",
    "warmup_epochs=1",
    "num_workers=0",
    "checkpoint_every=0",
    "mixup=0",
    "cutmix=0",
    "drop_path=0",
    "model_ema=true",
    "model_ema_decay=0.5",
    "se.weight=0.1",
    "se.schedule=constant",
    "drloc.weight=1",
    "drloc.pairs=6",
    "drloc.hidden=16",
]

# DRLoc's ranks draw their own pairs (seeds per rank), so the two set-ups would sample
# different pairs. This entry point gives every image of a step the same pairs, drawn from the
# step's count: the mean over each rank's half, averaged by DDP, is then the mean over the
# doubled batch.
SAME_PAIRS_MAIN = """
import sys
import torch
import spatial_entropy.regularizers as regularizers
from spatial_entropy.cli import main

calls = 0


def same_pairs_for_every_image(batch, grid_shape, pairs, generator=None, device=None):
    global calls
    calls += 1
    draw = torch.Generator().manual_seed(calls)
    shared = torch.randint(grid_shape[0] * grid_shape[1], (pairs, 2), generator=draw)
    return shared.expand(batch, pairs, 2).to(generator.device)


regularizers.sample_position_pairs = same_pairs_for_every_image
sys.exit(main(sys.argv[1:]))
"""


def _train(launcher: list[str], run_dir, batch_size: int) -> None:
    sets = [arg for item in [*TINY, f"batch_size={batch_size}"] for arg in ("--set", item)]
    entry = run_dir.parent / "same_pairs_main.py"
    entry.write_text(SAME_PAIRS_MAIN)
    command = [*launcher, str(entry), "train", "--output", str(run_dir), *sets]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _train(torchrun, tmp_path / "ddp", batch_size=4)
    _train([sys.executable], tmp_path / "single", batch_size=8)

    torch.manual_seed(0)  # the engine's initial weights: create_model under the run's seed,
    initial = create_model(
        "se_vit_tiny_patch4_32", num_classes=10, img_size=16, in_chans=1,
        depth=2, embed_dim=32, num_heads=2,
    ).state_dict()  # fmt: skip
    initial_head = DRLocHead(32, hidden=16).state_dict()  # then the DRLoc head
    heads = {
        name: load_checkpoint(latest_checkpoint(tmp_path / name / "checkpoints"))[1][
            "regularizer_modules"
        ]["drloc"]
        for name in ("ddp", "single")
    }
    final = load_file(tmp_path / "single" / "model.safetensors")
    for start, end in ((initial, final), (initial_head, heads["single"])):
        moved = max((start[k] - v).abs().max().item() for k, v in end.items())
        assert moved > 1e-2, "the steps barely moved the weights; the comparison would be vacuous"
    for key in heads["single"]:
        torch.testing.assert_close(heads["ddp"][key], heads["single"][key], rtol=0, atol=1e-5)

    for name in ("model.safetensors", "model_ema.safetensors"):
        ddp, single = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "single" / name)
        assert ddp.keys() == single.keys()
        for key in single:
            torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-5, msg=key)

    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert ddp_metrics["steps"] == single_metrics["steps"] == 4
    assert ddp_metrics["images"] == single_metrics["images"] == 100  # each image counted once
    # the attention statistics of the shards are summed, not averaged over ranks
    for key in ("loss", "train_loss", "train_se", "train_drloc", "se_mean", "regions_mean"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4), key
    # only rank 0 writes: one checkpoint directory, one log
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )


def test_every_rank_stops_when_another_process_trains_the_run(tmp_path):
    # rank 0 cannot take the run's lock: the other rank must stop too, not wait for rank 0 in
    # its first collective (the timeout would catch a hang)
    run_dir = tmp_path / "busy"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    sets = [arg for item in [*TINY, "batch_size=4"] for arg in ("--set", item)]
    command = [*torchrun, "-m", "spatial_entropy", "train", "--output", str(run_dir), *sets]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with RunPaths(run_dir).training_lock():
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("is being trained by another process") == 2, done.stderr[-3000:]
    assert list(run_dir.iterdir()) == []  # the holder's lock went with it; nothing written


def test_evaluate_with_attention_under_torchrun_matches_one_process(tmp_path):
    """Two ranks evaluate shards of unequal size (7 images); the reduced accuracy, statistics
    and Jaccard equal those of one process over the whole split, and rank 0 writes eval.json."""
    values = {
        "model": "se_vit_tiny_patch4_32",
        "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
        "dataset": "cluttered-fashion",
        "data_options": {"test_size": 7, "cache_dir": str(tmp_path / "cache")},
        "batch_size": 2,
        "num_workers": 0,
    }
    results = {}
    for name in ("single", "ddp"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        save_config(load_config(values=values), run_dir / "config.yaml")
        torch.manual_seed(0)
        model = create_model(values["model"], num_classes=10, in_chans=1, **values["model_kwargs"])
        save_weights(model, run_dir / "model.safetensors")
        # The single run goes first, so the cached scenes exist before two ranks read them.
        launcher = [sys.executable]
        if name == "ddp":
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        command = [*launcher, "-m", "spatial_entropy", "evaluate", str(run_dir), "--attention"]
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads((run_dir / "eval.json").read_text())
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "config.yaml", "eval.json", "model.safetensors"
        ]  # fmt: skip

    single, ddp = results["single"], results["ddp"]
    assert list(ddp) == list(single)
    assert ddp["images"] == single["images"] == ddp["jaccard_images"] == 7
    for key in ("top1", "top5", "loss", "se_mean", "regions_mean", "jaccard"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
    for key in ("se_per_head", "jaccard_per_head"):
        assert ddp[key] == pytest.approx(single[key], rel=1e-6), key
