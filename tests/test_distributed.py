"""torchrun DDP on CPU (gloo, 2 processes) takes the same steps as one process with the same
global batch and data order."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spatial_entropy.models import create_model

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
]


def _train(launcher: list[str], run_dir, batch_size: int) -> None:
    sets = [arg for item in [*TINY, f"batch_size={batch_size}"] for arg in ("--set", item)]
    command = [*launcher, "-m", "spatial_entropy", "train", "--output", str(run_dir), *sets]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_match_one_process(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    _train(torchrun, tmp_path / "ddp", batch_size=4)
    _train([sys.executable], tmp_path / "single", batch_size=8)

    torch.manual_seed(0)  # the engine's initial weights: create_model under the run's seed
    initial = create_model(
        "se_vit_tiny_patch4_32", num_classes=10, img_size=16, in_chans=1,
        depth=2, embed_dim=32, num_heads=2,
    ).state_dict()  # fmt: skip
    moved = max(
        (initial[k] - v).abs().max().item()
        for k, v in load_file(tmp_path / "single" / "model.safetensors").items()
    )
    assert moved > 1e-2, "the steps barely moved the weights; the comparison would be vacuous"

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
    for key in ("loss", "train_loss", "train_se", "se_mean", "regions_mean"):
        assert ddp_metrics[key] == pytest.approx(single_metrics[key], rel=1e-4), key
    # only rank 0 writes: one checkpoint directory, one log
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
