"""Exact resume: a run killed at a random step and resumed ends bit for bit like an unbroken one,
with both regularisers on (DRLoc adds a trainable head and its own sampling stream)."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spatial_entropy.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# Every random part of the recipe is on (RandAugment, random erasing, pad-crop-flip, Mixup/CutMix,
# drop path, EMA, DRLoc's pair sampling), so the test fails if any RNG stream does not continue
# exactly.
TINY = [
    "model=se_vit_tiny_patch4_32",
    "model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}",
    "img_size=16",
    "dataset=fashion-mnist",
    "n_per_class=4",
    "val_fraction=0.01",
    "batch_size=8",
    "epochs=3",
    "warmup_epochs=1",
    "num_workers=2",
    "checkpoint_every=1",
    "drop_path=0.1",
    "model_ema=true",
    "model_ema_decay=0.9",
    "se.weight=0.1",
    "se.warmup_epochs=1",
    "drloc.weight=0.1",
    "drloc.pairs=16",
    "drloc.hidden=32",
]
STEPS = 15  # 40 images / batch 8 = 5 steps per epoch


def _command(run_dir: Path, *extra: str) -> list[str]:
    sets = [arg for item in TINY for arg in ("--set", item)]
    return [
        sys.executable,
        "-m",
        "spatial_entropy",
        "train",
        "--output",
        str(run_dir),
        *sets,
        *extra,
    ]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().split("_")[1]) if pointer.exists() else 0


def test_killed_and_resumed_run_equals_unbroken_run(tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    subprocess.run(_command(unbroken), check=True, env=_env(), capture_output=True)

    kill_after = random.Random().randint(1, STEPS - 2)
    process = subprocess.Popen(
        _command(broken), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while _latest_step(broken) < kill_after and process.poll() is None:
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (broken / "model.safetensors").exists(), "the run finished before the kill"

    subprocess.run(
        _command(broken, "--resume", "auto"), check=True, env=_env(), capture_output=True
    )

    for name in ("model.safetensors", "model_ema.safetensors"):
        expected, actual = load_file(unbroken / name), load_file(broken / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}:{key} (killed at {kill_after})"
    assert _log_without_timings(broken) == _log_without_timings(unbroken)
    # The DRLoc head and its sampling stream, saved in the last checkpoint of each run.
    expected, actual = (load_checkpoint(run / "checkpoints" / f"step_{STEPS:08d}")[1]
                        for run in (unbroken, broken))  # fmt: skip
    head, resumed_head = (s["regularizer_modules"]["drloc"] for s in (expected, actual))
    assert head.keys() == resumed_head.keys() and len(head) == 6
    assert all(torch.equal(head[k], resumed_head[k]) for k in head), f"killed at {kill_after}"
    stream, resumed_stream = (s["ranks"][0]["regularizers"]["drloc"] for s in (expected, actual))
    assert torch.equal(stream["generator"], resumed_stream["generator"])


def _log_without_timings(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == 3
        and {"train_loss", "train_se", "train_drloc", "val_top1", "val_ema_top1"} <= rows[0].keys()
    )
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in rows]
