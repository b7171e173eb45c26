"""A run directory is never lost or silently changed: resume, overwrite, unreadable files, JSON.

Every refused or repeated command must leave every file of the run byte for byte as it was.
"""

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from spatial_entropy.checkpoint import (
    TrainState,
    UnreadableFileError,
    load_checkpoint,
    save_weights,
)
from spatial_entropy.cli import main
from spatial_entropy.config import RESUMABLE_KEYS, load_config, save_config
from spatial_entropy.distributed import DistributedInfo
from spatial_entropy.engine import build_training_run, train
from spatial_entropy.evaluation import evaluate_run
from spatial_entropy.models import create_model, load_checkpoint_into
from spatial_entropy.runs import RunPaths, load_run, to_json

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def _hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> its SHA-256."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _refused(capsys, argv: list[str], match: str) -> None:
    """``spatial-entropy ARGV`` fails with a message matching ``match`` (printed on stderr with
    exit code 1, or raised as ``SystemExit(message)``, as the command reports its errors)."""
    capsys.readouterr()
    try:
        code, message = main(argv), capsys.readouterr().err
    except SystemExit as exc:
        code, message = 1, str(exc.code)
    assert code == 1 and re.search(match, message), message


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# --- the `train` command on a tiny cluttered-fashion run (2 steps per epoch) -----------------


@pytest.fixture
def finished(tmp_path, tiny_sets):
    """A finished run (3 steps, stopped mid-epoch by max_steps) and its files' hashes."""
    run = tmp_path / "run"
    assert main(["train", "--output", str(run), *tiny_sets()]) == 0
    return run, _hashes(run)


@pytest.mark.slow
def test_resuming_a_finished_run_reads_its_config_and_changes_nothing(finished, capsys):
    run, before = finished
    capsys.readouterr()
    # No --config: the run's own config.yaml, not the built-in defaults.
    assert main(["train", "--output", str(run), "--resume", "auto"]) == 0
    assert "has finished (3 steps); nothing to do" in capsys.readouterr().out
    assert _hashes(run) == before
    # A key that does not change what is computed is accepted; still nothing to do.
    assert main(["train", "--output", str(run), "--resume", "auto", "--set", "eval_every=2"]) == 0
    assert _hashes(run) == before


@pytest.mark.slow
def test_resume_refuses_a_change_outside_the_resumable_keys(finished, tmp_path, capsys):
    run, before = finished
    for change in ("model=se_vit_small_patch8_64", "lr=1e-3", "se.weight=0"):
        key = change.split("=")[0]
        argv = ["train", "--output", str(run), "--resume", "auto", "--set", change]
        _refused(capsys, argv, f"may change only .*'{key}': ")
        assert _hashes(run) == before, change
    # A --config that differs from the run's config in such a key is refused as well.
    other = tmp_path / "other.yaml"
    other.write_text((run / "config.yaml").read_text().replace("seed: 0", "seed: 1"))
    argv = ["train", "--output", str(run), "--resume", "auto", "--config", str(other)]
    _refused(capsys, argv, "'seed': 0 -> 1")
    assert _hashes(run) == before


@pytest.mark.slow
def test_a_larger_max_steps_continues_a_finished_run_and_keeps_its_log(finished):
    run, _ = finished
    first = _rows(run)
    assert [r["step"] for r in first] == ["2", "3"]
    assert main(["train", "--output", str(run), "--resume", "auto", "--set", "max_steps=4"]) == 0
    rows = _rows(run)
    # Epoch 0 is kept as it was; epoch 1, cut at step 3, is now complete (step 4).
    assert rows[0] == first[0] and [r["step"] for r in rows] == ["2", "4"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4
    for key in ("top1", "loss", "train_loss", "train_se", "images_per_s", "best_top1"):
        assert metrics[key] is not None, key
    assert float(rows[-1]["train_loss"]) == pytest.approx(metrics["train_loss"])


@pytest.mark.slow
def test_a_run_without_checkpoints_is_not_overwritten(finished, tiny_sets, capsys):
    run, _ = finished
    for path in (run / "checkpoints").iterdir():  # deleted to save disk
        path.unlink()
    (run / "checkpoints").rmdir()
    before = _hashes(run)
    _refused(
        capsys, ["train", "--output", str(run), *tiny_sets()], "already holds a run .*--overwrite"
    )
    assert _hashes(run) == before
    # Resuming it: finished, nothing to do; asking for more: refused, it cannot continue.
    assert main(["train", "--output", str(run), "--resume", "auto"]) == 0
    assert "has finished" in capsys.readouterr().out
    argv = ["train", "--output", str(run), "--resume", "auto", "--set", "max_steps=4"]
    _refused(capsys, argv, "without checkpoints .* cannot continue")
    assert _hashes(run) == before


@pytest.mark.slow
def test_overwrite_validates_first_then_replaces_the_whole_run(finished, tiny_sets, capsys):
    run, before = finished
    (run / "eval.json").write_text("{}")  # a file of the old run that training never writes
    (run / "notes.txt").write_text("mine")  # not a file of the run
    (run / "checkpoints" / ".step_00000004.pt.abcd1234.tmp").write_bytes(b"")  # killed save
    before = _hashes(run)
    # A start that fails validation (unknown dataset) writes nothing, even with --overwrite.
    argv = ["train", "--output", str(run), "--overwrite", *tiny_sets("dataset=nope")]
    _refused(capsys, argv, "dataset")
    assert _hashes(run) == before

    assert main(["train", "--output", str(run), "--overwrite", *tiny_sets("max_steps=2")]) == 0
    assert not (run / "eval.json").exists() and (run / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in _rows(run)] == ["2"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt"]


@pytest.mark.slow
def test_a_run_being_trained_is_neither_trained_again_nor_overwritten(finished, tiny_sets, capsys):
    run, before = finished

    def unchanged() -> bool:
        return {k: v for k, v in _hashes(run).items() if k != ".lock"} == before

    # another training holds its lock (in this process: refused by the registry of held locks)
    with RunPaths(run).training_lock():
        for extra in (["--overwrite", *tiny_sets()], ["--resume", "auto"], tiny_sets()):
            _refused(capsys, ["train", "--output", str(run), *extra], "trained by another process")
            assert unchanged(), extra
    assert not (run / ".lock").exists()  # released and removed with the block
    # a lock file left by a killed process holds nothing: the run continues
    (run / ".lock").write_bytes(b"")
    assert main(["train", "--output", str(run), "--resume", "auto", "--set", "max_steps=4"]) == 0
    assert [r["step"] for r in _rows(run)] == ["2", "4"] and not (run / ".lock").exists()


def test_a_start_that_fails_validation_creates_nothing(tmp_path, capsys):
    for run in (tmp_path / "new", tmp_path / "deeper" / "still" / "new"):
        argv = ["train", "--output", str(run), "--set", "dataset=nope", "--set", "num_workers=0"]
        _refused(capsys, argv, "nope")
        assert list(tmp_path.iterdir()) == [], run


@pytest.mark.slow
def test_truncated_weights_are_named_by_evaluate_attention_and_the_library(
    finished, tmp_path, capsys
):
    run, _ = finished
    _truncate(run / "model.safetensors")
    weights = str(run / "model.safetensors")
    _refused(capsys, ["evaluate", str(run)], f"cannot read {weights}: truncated or corrupt")
    argv = ["attention", str(run), "--count", "1", "--out", str(tmp_path / "a.png")]
    _refused(capsys, argv, f"cannot read {weights}: truncated")
    with pytest.raises(UnreadableFileError, match=f"cannot read {weights}"):
        load_run(run)
    model = create_model(
        "se_vit_tiny_patch4_32", num_classes=10, depth=1, embed_dim=32, num_heads=2
    )
    with pytest.raises(UnreadableFileError, match=f"cannot read {weights}"):
        load_checkpoint_into(model, weights)
    (stem,) = sorted((run / "checkpoints").glob("step_*.pt"))[-1:]
    _truncate(stem)
    with pytest.raises(UnreadableFileError, match=f"cannot read {stem}: truncated"):
        load_checkpoint(stem.with_suffix(""))


# --- the library, on in-memory data -----------------------------------------------------------


class _Images(TensorDataset):
    num_classes, in_chans = 3, 1


def _data(n: int = 8) -> _Images:
    images = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return _Images(images, torch.arange(n) % 3)


def _config(**values):
    vit = dict(model="se_vit_tiny_patch4_32", img_size=16,
               model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2})  # fmt: skip
    recipe = dict(epochs=2, batch_size=4, num_workers=0, mixup=0, cutmix=0, warmup_epochs=0,
                  checkpoint_every=1, se={"weight": 0.1, "warmup_epochs": 0})  # fmt: skip
    return load_config(values=vit | recipe | values)


def test_a_longer_epochs_makes_the_schedule_follow_the_longer_run(tmp_path):
    data = (_data(), _data())  # 2 steps per epoch
    train(_config(), tmp_path, datasets=data)
    train(_config(epochs=4, max_steps=6), tmp_path, resume=True, datasets=data)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == ["2", "4", "6"]
    # timm's cosine, stepped per update over 4 epochs of 2 steps: lr(t) at t = 6 of 8
    lr, min_lr = 5e-4, 1e-5
    expected = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * 6 / 8))
    assert float(rows[2]["lr"]) == pytest.approx(expected, rel=1e-9)
    # lambda: cosine from its peak at t = 0 to 0 at t = 4 epochs, seen before step 6 (t = 2.5)
    assert float(rows[2]["se_weight"]) == pytest.approx(0.05 * (1 + math.cos(math.pi * 2.5 / 4)))


def test_a_run_killed_before_its_final_files_ends_on_resume_with_its_log_kept(tmp_path):
    data = (_data(), _data())
    expected = train(_config(max_steps=3), tmp_path, datasets=data)  # stops mid-epoch 1
    log = (tmp_path / "log.csv").read_bytes()
    for name in ("model.safetensors", "metrics.json"):  # as if killed before writing them
        (tmp_path / name).unlink()
    metrics = train(_config(max_steps=3), tmp_path, resume=True, datasets=data)
    assert (tmp_path / "log.csv").read_bytes() == log
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for key in ("top1", "loss", "steps", "train_loss", "train_se", "images_per_s"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6), key


def test_a_resume_never_shortens_a_run(tmp_path):
    data = (_data(), _data())
    train(_config(max_steps=3), tmp_path, datasets=data)
    before = _hashes(tmp_path)
    with pytest.raises(ValueError, match="at step 3, beyond the 2 steps .* not shortened"):
        train(_config(max_steps=2), tmp_path, resume=True, datasets=data)
    assert _hashes(tmp_path) == before


def test_a_checkpoint_saved_without_a_gradient_scaler_resumes_under_fp16(tmp_path):
    # A run resumed on another device (a resumable key) may get fp16 where it had none
    # (`amp: auto`: off on a CPU, fp16 on a GPU without bf16): its scaler starts afresh.
    train(_config(max_steps=1, amp="off"), tmp_path, datasets=(_data(), _data()))
    weights, saved = load_checkpoint(tmp_path / "checkpoints" / "step_00000001")
    state = TrainState.from_dict(saved)
    assert state.scaler == {}
    run = build_training_run(_config(amp="fp16"), DistributedInfo(), 3, 1, 2, (weights, state))
    assert run.scaler.is_enabled() and run.scaler.get_scale() == 2.0**16 and run.step == 1


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_unreadable(
    tmp_path, capsys
):
    data = (_data(), _data())
    unbroken = tmp_path / "unbroken"
    train(_config(max_steps=4), unbroken, datasets=data)
    for name in ("step_00000003.pt", "step_00000003.safetensors"):
        run = tmp_path / name
        train(_config(max_steps=3), run, datasets=data)  # keeps steps 2 and 3
        _truncate(run / "checkpoints" / name)
        capsys.readouterr()
        train(_config(max_steps=4), run, resume=True, datasets=data)
        warning = capsys.readouterr().err
        assert f"cannot read {run / 'checkpoints' / name}" in warning
        assert "resuming from the older step_00000002" in warning
        expected, actual = (
            load_file(unbroken / "model.safetensors"),
            load_file(run / "model.safetensors"),
        )
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name


def test_resume_with_no_readable_checkpoint_names_the_file_and_writes_nothing(tmp_path):
    data = (_data(), _data())
    train(_config(max_steps=3), tmp_path, datasets=data)
    for path in (tmp_path / "checkpoints").glob("step_*.pt"):
        _truncate(path)
    before = _hashes(tmp_path)
    latest = tmp_path / "checkpoints" / "step_00000003.pt"
    with pytest.raises(UnreadableFileError, match=f"cannot read {latest}: .*no older checkpoint"):
        train(_config(max_steps=4), tmp_path, resume=True, datasets=data)
    assert _hashes(tmp_path) == before


def test_stale_temporary_files_of_a_killed_save_are_removed_at_start(tmp_path):
    data = (_data(), _data())
    train(_config(max_steps=3), tmp_path, datasets=data)
    ours = [
        tmp_path / "checkpoints" / ".step_00000004.pt.k2x_9abc.tmp",
        tmp_path / "checkpoints" / ".step_00000004.safetensors.a1b2c3d4.tmp",
        tmp_path / "checkpoints" / ".latest.zz00zz00.tmp",
        tmp_path / ".model.safetensors.q1w2e3r4.tmp",
        tmp_path / ".log.csv.abcdefgh.tmp",
    ]
    others = [tmp_path / "checkpoints" / ".mine.abcdefgh.tmp", tmp_path / "notes.tmp"]
    for path in ours + others:
        path.write_bytes(b"partial")
    train(_config(max_steps=4), tmp_path, resume=True, datasets=data)
    assert [p for p in ours if p.exists()] == []
    assert all(p.read_bytes() == b"partial" for p in others)


def test_a_non_finite_validation_loss_stops_the_run_before_it_writes_results(tmp_path):
    val = _data(4)
    val.tensors[0][1, 0, 3, 3] = float("nan")  # training stays finite; evaluation does not
    with pytest.raises(FloatingPointError, match="validation loss is nan at step 2"):
        train(_config(), tmp_path, datasets=(_data(), val))
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "log.csv").exists()


def test_json_of_a_run_has_null_where_a_value_is_not_finite(tmp_path):
    def strict(text):  # the JSON standard: NaN and Infinity are not values
        return json.loads(text, parse_constant=lambda word: pytest.fail(f"bare {word}"))

    assert strict(to_json({"loss": math.nan, "per_head": [1.0, -math.inf], "n": 3})) == {
        "loss": None, "per_head": [1.0, None], "n": 3,
    }  # fmt: skip
    # evaluate: weights whose outputs are NaN give loss null in eval.json
    data_options = {"test_size": 4, "cache_dir": str(tmp_path / "data")}
    config = _config(dataset="cluttered-fashion", data_options=data_options)
    save_config(config, tmp_path / "config.yaml")
    model = create_model(config.model, num_classes=10, img_size=16, in_chans=1,
                         **config.model_kwargs)  # fmt: skip
    with torch.no_grad():
        model.head.bias.fill_(math.nan)
    save_weights(model, tmp_path / "model.safetensors")
    metrics = evaluate_run(tmp_path, device="cpu")
    assert math.isnan(metrics["loss"])
    assert strict((tmp_path / "eval.json").read_text())["loss"] is None


def test_the_resumable_keys_are_documented():
    text = DOCS.read_text()
    section = text[text.index("### What a resume may change") :]
    for key in RESUMABLE_KEYS:
        assert f"`{key}`" in section.split("\n## ")[0], key
