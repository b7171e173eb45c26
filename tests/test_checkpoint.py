"""Tests of atomic checkpoints, safe loading and RNG state capture."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from spatial_entropy.checkpoint import (
    RankState,
    TrainState,
    UnreadableFileError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from spatial_entropy.files import atomic_write
from spatial_entropy.rng import get_rng_state, preserved_rng, seed_all, set_rng_state


def _draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(()).item()  # noqa: NPY002


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)  # noqa: NPY002
    np.random.randn()  # noqa: NPY002  (leaves a cached Gaussian in NumPy's state)
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def test_seed_all_is_deterministic_and_preserved_rng_restores_the_outer_streams():
    torch.manual_seed(0)
    outer = get_rng_state()
    with preserved_rng():
        seed_all(7)
        first = _draws()
        seed_all(7)
        assert _draws() == first
    after = _draws()
    set_rng_state(outer)
    assert _draws() == after


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "file"
    atomic_write(path, b"old")

    def crash(*args):
        raise KeyboardInterrupt  # e.g. Ctrl-C between writing and renaming

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temporary left behind


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_save_load_latest_and_pruning(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    for step in (10, 20, 30):
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": get_rng_state()}
        save_checkpoint(tmp_path, step, model, state, keep=2)
    stem = latest_checkpoint(tmp_path)
    assert stem.name == "step_00000030"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_00000020.pt",
        "step_00000020.safetensors",
        "step_00000030.pt",
        "step_00000030.safetensors",
    ]
    weights, state = load_checkpoint(stem)
    assert state["step"] == 30
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value)
    restored = torch.optim.AdamW(_model().parameters())
    restored.load_state_dict(state["optimizer"])
    for index, buffers in optimizer.state_dict()["state"].items():
        for name, value in buffers.items():
            assert torch.equal(restored.state_dict()["state"][index][name], value)


def test_no_checkpoint_and_dangling_pointer(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("step_00000005")
    with pytest.raises(FileNotFoundError, match="step_00000005"):
        latest_checkpoint(tmp_path)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_loading_never_unpickles_code(tmp_path):
    save_checkpoint(tmp_path, 1, _model(), {"step": 1})
    torch.save({"step": 1, "evil": _Payload()}, tmp_path / "step_00000001.pt")
    with pytest.raises(
        UnreadableFileError, match="step_00000001.pt: it holds objects besides tensors"
    ):
        load_checkpoint(latest_checkpoint(tmp_path))


def test_train_state_round_trips_through_a_checkpoint(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    ranks = [RankState(get_rng_state(), {"loss": torch.tensor(2.5, dtype=torch.float64)})]
    state = TrainState(
        epoch=3, batch=2, step=17, elapsed=1.5, best={"top1": 50.0, "epoch": 2, "step": 15},
        global_batch=8, optimizer=optimizer.state_dict(), ema=model.state_dict(), ranks=ranks,
    )  # fmt: skip
    stem = save_checkpoint(tmp_path, state.step, model, state.to_dict())
    _, saved = load_checkpoint(stem)  # weights_only: plain values and tensors only
    restored = TrainState.from_dict(saved)
    assert (restored.epoch, restored.batch, restored.step) == (3, 2, 17)
    assert restored.best == {"top1": 50.0, "epoch": 2, "step": 15}
    assert restored.ranks[0].epoch_sums["loss"].item() == 2.5
    assert torch.equal(restored.ema["0.weight"], model.state_dict()["0.weight"])
    assert restored.optimizer["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    set_rng_state(restored.ranks[0].rng)
    first = _draws()
    set_rng_state(ranks[0].rng)
    assert _draws() == first


def test_train_state_defaults_missing_keys_and_refuses_unknown_ones():
    # A checkpoint written before a field existed loads with the field's default.
    assert TrainState.from_dict({"epoch": 1, "step": 5}) == TrainState(epoch=1, step=5)
    # ... such as one from before regularisers had modules and per-rank states (DRLoc)
    old = TrainState.from_dict({"step": 5, "ranks": [{"rng": {}, "epoch_sums": {}}]})
    assert old.regularizer_modules == {} and old.ranks[0].regularizers == {}
    with pytest.raises(ValueError, match=r"unknown keys \['rng_of_the_future'\]"):
        TrainState.from_dict({"rng_of_the_future": 1})
    with pytest.raises(ValueError, match="RankState"):
        TrainState.from_dict({"ranks": [{"rng": {}, "extra": 1}]})
