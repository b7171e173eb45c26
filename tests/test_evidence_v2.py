"""The second benchmark protocol's bookkeeping: pilot rule, λ selection, record, seed order,
hypotheses. No training: the training and data functions are replaced by fakes."""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spatial_entropy.models import create_model


@pytest.fixture(scope="module")
def ev(load_benchmark):
    return load_benchmark("evidence_v2")


def row(epoch: int, loss: float, top1: float | None = None) -> dict:
    return {"epoch": epoch, "train_loss": loss, "train_top1": top1}


def test_choose_epochs_training_accuracy(ev) -> None:
    # loss falls 10 % an epoch (never a plateau); top-1 evaluated every 5 epochs
    top1 = {5: 60.0, 10: 80.0, 15: 96.0, 20: 99.0}
    log = [row(e, 2.0 * 0.9**e, top1.get(e)) for e in range(1, 21)]
    epochs, reason = ev.choose_epochs(log, 20)
    assert epochs == 15 and "96.0" in reason


def test_choose_epochs_plateau(ev) -> None:
    # max 20 epochs: window 2. Means of consecutive windows, by hand: epoch 7 compares
    # (1.0 + 1.0) / 2 = 1.0 with (1.1 + 1.0) / 2 = 1.05 (fell 4.8 %: no); epoch 8 compares
    # 1.0 with 1.0 (fell 0 % < 1 %: plateau).
    losses = [2.0, 1.6, 1.3, 1.1] + [1.0] * 16
    log = [row(e + 1, loss, 50.0 if e % 5 == 4 else None) for e, loss in enumerate(losses)]
    epochs, reason = ev.choose_epochs(log, 20)
    assert epochs == 8 and "plateau" in reason


def test_choose_epochs_neither(ev) -> None:
    log = [row(e, 2.0 * 0.9**e, 50.0) for e in range(1, 21)]
    assert ev.choose_epochs(log, 20) == (20, "neither criterion met: the pilot's full length")


def test_carve_is_deterministic_stratified_and_disjoint(ev) -> None:
    targets = [c for c in range(10) for _ in range(50)]
    fit, val = ev.carve(targets, seed=3)
    assert (fit, val) == ev.carve(targets, seed=3)
    assert ev.carve(targets, seed=4)[1] != val
    assert sorted(fit + val) == list(range(500)) and not set(fit) & set(val)
    assert all(sum(targets[i] == c for i in val) == 10 for c in range(10))


class FakeSet:
    """A training subset as build_dataset returns it: only ``targets`` matter here."""

    def __init__(self, n_per_class: int) -> None:
        self.targets = [c for c in range(10) for _ in range(n_per_class)]

    def __len__(self) -> int:
        return len(self.targets)


def test_selection_runs_use_validation_never_test(ev, tmp_path, monkeypatch) -> None:
    splits, seen = [], []
    scores = {0.01: 50.0, 0.03: 70.0, 0.1: 60.0}

    def fake_build_dataset(name, split, **kwargs):
        splits.append(split)
        return FakeSet(kwargs["n_per_class"])

    def fake_train(config, run_dir, resume=False, datasets=None):
        fit, val = datasets
        seen.append((set(fit.indices), set(val.indices)))
        run_dir.mkdir(parents=True)
        metrics = {"top1": scores[config.se.weight], "steps": 3, "train_time_s": 1.0}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))

    monkeypatch.setattr(ev, "build_dataset", fake_build_dataset)
    monkeypatch.setattr(ev, "train", fake_train)
    size = ev.Size(50, 3, 1)
    runs = [ev.run_arm(size, f"se_val@{w:g}", 0, tmp_path, None, "cpu") for w in ev.VAL_LAMBDAS]
    assert [(r["arm"], r["lambda"], r["top1"]) for r in runs] == [
        ("se_val@0.01", 0.01, 50.0), ("se_val@0.03", 0.03, 70.0), ("se_val@0.1", 0.1, 60.0),
    ]  # fmt: skip
    assert set(splits) == {"train"}  # neither "test" nor "val" (the test scenes) is built
    for fit, val in seen:
        assert len(fit) == 400 and len(val) == 100 and not fit & val
    record = {"selection": runs}
    chosen = ev.select_lambda(ev.selection_scores(record, 50, 0))
    assert chosen == {"lambda": 0.03, "val_top1": {"0.01": 50.0, "0.03": 70.0, "0.1": 60.0}}
    # read back, not retrained
    assert ev.run_arm(size, "se_val@0.03", 0, tmp_path, None, "cpu")["top1"] == 70.0
    assert len(seen) == 3
    # a tie goes to the smaller λ
    assert ev.select_lambda({0.01: 70.0, 0.03: 70.0, 0.1: 60.0})["lambda"] == 0.01


def test_se_val_waits_for_its_recorded_selection_runs_across_sessions(
    ev, tmp_path, monkeypatch
) -> None:
    results = record_with_pilot_50(ev, tmp_path / "record.json")
    calls, killed, val_top1 = [], [], {0.01: 60.0, 0.03: 65.0, 0.1: 61.0}

    def fake_run_arm(size, arm, seed, work_dir, variant, device, speed=None, selections=None):
        calls.append(arm)
        if arm.startswith("se_val@"):
            if arm == "se_val@0.1" and not killed:
                killed.append(arm)
                raise RuntimeError("killed")  # the first session loses this one
            weight = float(arm.split("@")[1])
            return {"n_per_class": 50, "arm": arm, "seed": seed, "lambda": weight,
                    "top1": val_top1[weight]}  # fmt: skip
        result = fake_result(size, arm, seed)
        if arm == "se_val":
            result |= ev.select_lambda(selections[(50, seed)])
        return result

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    argv = ["evidence_v2", "--sizes", "50", "--arms", "baseline", "se_val", "--seeds", "1",
            "--results", str(results)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [*argv, "--work-dir", str(tmp_path / "machine1")])
    ev.main()
    assert calls == ["baseline", "se_val@0.01", "se_val@0.03", "se_val@0.1"]
    stored = json.loads(results.read_text())
    assert [r["arm"] for r in stored["selection"]] == ["se_val@0.01", "se_val@0.03"]
    assert [r["arm"] for r in stored["runs"]] == ["baseline"]  # selection runs are not arms
    assert "- n = 50, seed 0: λ 0.01: 60.0, λ 0.03: 65.0" in ev.report(stored)
    # a fresh machine trains the missing selection run, then se_val in the same invocation
    calls.clear()
    monkeypatch.setattr(sys, "argv", [*argv, "--work-dir", str(tmp_path / "machine2")])
    ev.main()
    assert calls == ["se_val@0.1", "se_val"]
    stored = json.loads(results.read_text())
    se_val = [r for r in stored["runs"] if r["arm"] == "se_val"]
    assert se_val[0]["lambda"] == 0.03 and se_val[0]["val_top1"]["0.1"] == 61.0


def test_se_val_runs_in_seed_order_once_its_selection_is_recorded_in_the_invocation(
    ev, tmp_path, monkeypatch
) -> None:
    # seed 0's se_val becomes available mid-invocation: it goes before seed 1's runs, not after
    # every run queued at the start (partial results stay paired, seed by seed)
    results = record_with_pilot_50(ev, tmp_path / "record.json")
    calls, val_top1 = (
        [],
        {0: {0.01: 60.0, 0.03: 65.0, 0.1: 61.0}, 1: {0.01: 1.0, 0.03: 1.0, 0.1: 9.0}},
    )

    def fake_run_arm(size, arm, seed, work_dir, variant, device, speed=None, selections=None):
        calls.append((arm, seed))
        if arm.startswith("se_val@"):
            weight = float(arm.split("@")[1])
            return {"n_per_class": 50, "arm": arm, "seed": seed, "lambda": weight,
                    "top1": val_top1[seed][weight]}  # fmt: skip
        result = fake_result(size, arm, seed)
        if arm == "se_val":  # the λ its recorded selection runs chose, passed to the worker
            result |= ev.select_lambda(selections[(50, seed)])
        return result

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    argv = ["evidence_v2", "--sizes", "50", "--arms", "baseline", "se_val", "--seeds", "2",
            "--results", str(results), "--work-dir", str(tmp_path / "runs")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ev.main()
    selection = [("se_val@0.01", 0), ("se_val@0.03", 0), ("se_val@0.1", 0)]
    assert calls == [("baseline", 0), *selection, ("se_val", 0), ("baseline", 1),
                     *((arm, 1) for arm, _ in selection), ("se_val", 1)]  # fmt: skip
    stored = json.loads(results.read_text())
    chosen = {r["seed"]: r["lambda"] for r in stored["runs"] if r["arm"] == "se_val"}
    assert chosen == {0: 0.03, 1: 0.1}


def test_se_val_at_the_published_lambda_is_the_se_run(ev) -> None:
    # the published schedule is λ 0.01 (Peruzzo et al.); se_val keeps that schedule, so only
    # at λ 0.01 is its config se's, and at no λ any other arm's
    size = ev.Size(50, 400, 5)
    assert ev.PUBLISHED_SE["weight"] == 0.01
    assert [ev.same_training(size, 2, w) for w in ev.VAL_LAMBDAS] == ["se", None, None]


def test_se_val_is_not_trained_again_when_it_chose_ses_config(ev, tmp_path, monkeypatch) -> None:
    results = record_with_pilot_50(ev, tmp_path / "record.json")
    calls, killed, val_top1 = [], [], {0.01: 65.0, 0.03: 60.0, 0.1: 61.0}

    def fake_run_arm(size, arm, seed, work_dir, variant, device, speed=None, selections=None):
        calls.append(arm)
        if arm == "se" and not killed:
            killed.append(arm)
            raise RuntimeError("killed")  # the first session loses se
        if arm.startswith("se_val@"):
            weight = float(arm.split("@")[1])
            return {"n_per_class": 50, "arm": arm, "seed": seed, "lambda": weight,
                    "top1": val_top1[weight], "steps": 1, "train_time_s": 1.0,
                    "device": "cpu"}  # fmt: skip
        return fake_result(size, arm, seed) | {"train_time_s": 2.0, "device": "cpu"}

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    argv = ["evidence_v2", "--sizes", "50", "--arms", "baseline", "se", "se_val", "--seeds",
            "1", "--results", str(results), "--work-dir", str(tmp_path / "runs")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ev.main()
    # the selection chose 0.01: se_val's final run waits for se's instead of training
    assert calls == ["baseline", "se", "se_val@0.01", "se_val@0.03", "se_val@0.1"]
    assert [r["arm"] for r in json.loads(results.read_text())["runs"]] == ["baseline"]
    calls.clear()
    ev.main()  # the next session trains se, and se's run is recorded as se_val's too
    assert calls == ["se"]
    stored = json.loads(results.read_text())
    se, se_val = ([r for r in stored["runs"] if r["arm"] == arm] for arm in ("se", "se_val"))
    assert len(se_val) == 1 and se_val[0]["same_run_as"] == "se"
    assert se_val[0]["top1"] == se[0]["top1"] and se_val[0]["lambda"] == 0.01
    assert se_val[0]["val_top1"] == {"0.01": 65.0, "0.03": 60.0, "0.1": 61.0}
    text = ev.report(stored)
    assert "(the same config as se: se_val's run is that run)" in text
    # timed: 3 selection runs, baseline and se; se_val's time is se's, not counted twice
    assert "se_vit_small_patch4_56: 1.000 s (5 runs)" in text
    calls.clear()
    ev.main()
    assert calls == [] and len(json.loads(results.read_text())["runs"]) == 3


def test_pending_skips_recorded_runs_in_seed_order(ev) -> None:
    record = {"pilot": {"50": {"epochs": 30}}, "runs": [
        {"n_per_class": 50, "arm": "baseline", "seed": 0}]}  # fmt: skip
    pilots, runs = ev.pending(record, [50, 100], ["baseline", "se"], 2)
    assert [(s.n_per_class, s.epochs, a) for s, a, _ in pilots] == [(100, 400, "pilot")]
    assert [(s.n_per_class, s.epochs, a, k) for s, a, k in runs] == [
        (50, 30, "se", 0), (50, 30, "baseline", 1), (50, 30, "se", 1)]  # fmt: skip
    record["pilot"]["100"] = {"epochs": 12}
    _, runs = ev.pending(record, [50, 100], ["baseline", "se"], 2)
    order = ev.seed_order(["baseline", "se"])
    assert [(s.n_per_class, a, k) for s, a, k in sorted(runs, key=order)] == [
        (50, "se", 0), (100, "baseline", 0), (100, "se", 0),
        (50, "baseline", 1), (50, "se", 1), (100, "baseline", 1), (100, "se", 1)]  # fmt: skip


def fake_result(size, arm, seed) -> dict:
    if arm == "pilot":
        return {"n_per_class": size.n_per_class, "max_epochs": size.epochs, "epochs": 7,
                "reason": "test", "top1": 99.0, "steps": 1, "train_time_s": 1.0,
                "device": "cpu", "log": []}  # fmt: skip
    return {"n_per_class": size.n_per_class, "epochs": size.epochs, "arm": arm, "seed": seed,
            "steps": 1, "top1": 50.0 + seed, "train_top1": 90.0, "gap": 40.0 - seed,
            "jaccard": None, "se_mean": None}  # fmt: skip


def record_with_pilot_50(ev, results):
    """A new record at ``results`` that holds the 50-per-class pilot only."""
    record = ev.load_record(results)
    record["pilot"]["50"] = fake_result(ev.Size(50, 400, 1), "pilot", 0)
    ev.save_record(record, results)
    return results


def test_record_survives_sessions(ev, tmp_path, monkeypatch, capsys) -> None:
    results = tmp_path / "record.json"
    calls = []

    def fake_run_arm(size, arm, seed, work_dir, variant, device, speed=None, selections=None):
        # every run finished before this one is already in the record on disk
        on_disk = json.loads(results.read_text()) if results.is_file() else {"runs": []}
        calls.append((size.n_per_class, arm, seed, len(on_disk["runs"])))
        return fake_result(size, arm, seed)

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    common = ["--sizes", "50", "--arms", "baseline", "se", "--results", str(results)]
    monkeypatch.setattr(sys, "argv", ["evidence_v2", *common, "--seeds", "2",
                                      "--work-dir", str(tmp_path / "machine1")])  # fmt: skip
    ev.main()
    assert calls == [(50, "pilot", 0, 0), (50, "baseline", 0, 0), (50, "se", 0, 1),
                     (50, "baseline", 1, 2), (50, "se", 1, 3)]  # fmt: skip
    record = json.loads(results.read_text())
    assert record["pilot"]["50"]["epochs"] == 7 and len(record["runs"]) == 4
    assert all(r["epochs"] == 7 for r in record["runs"])  # the pilot's choice, frozen
    # each run says how it was executed: its seconds per step are read with that
    execution = {"jobs": 1, "threads": None, "group": False, "num_workers": 0,
                 "data_on_device": "auto", "fused_attention": False,
                 "platform": platform.platform()}  # fmt: skip
    assert all(r["execution"] == execution for r in [*record["runs"], record["pilot"]["50"]])
    # a fresh machine (another work dir) with one more seed: only seed 2 is run
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["evidence_v2", *common, "--seeds", "3",
                                      "--work-dir", str(tmp_path / "machine2")])  # fmt: skip
    monkeypatch.setattr(ev.platform, "platform", lambda: "machine two")
    ev.main()
    assert [c[:3] for c in calls] == [(50, "baseline", 2), (50, "se", 2)]
    record = json.loads(results.read_text())
    assert len(record["runs"]) == 6
    assert "0 still to do" in capsys.readouterr().out
    # each run keeps the machine it ran on; nothing record-wide says one machine made all
    machines = [(r["seed"], r["execution"]["platform"]) for r in record["runs"]]
    assert machines == [(k, execution["platform"]) for k in (0, 0, 1, 1)] + [
        (2, "machine two"), (2, "machine two")]  # fmt: skip
    assert "machine" not in record


def test_two_invocations_on_one_record_keep_each_others_runs(ev, tmp_path) -> None:
    # two invocations load the same record, then each finishes a different run: the second
    # write must not drop the first's run (before the merge it wrote its stale copy over it)
    path = record_with_pilot_50(ev, tmp_path / "record.json")
    size = ev.Size(50, 7, 1)
    first, second = ev.load_record(path), ev.load_record(path)
    ev.merge_record(first, path, (size, "baseline", 0), fake_result(size, "baseline", 0))
    ev.merge_record(second, path, (size, "se", 0), fake_result(size, "se", 0))
    ev.merge_record(first, path)  # the end of an invocation: nothing new, a refresh
    on_disk = json.loads(path.read_text())
    assert sorted((r["arm"], r["seed"]) for r in on_disk["runs"]) == [("baseline", 0), ("se", 0)]
    assert on_disk["pilot"]["50"]["epochs"] == 7
    assert first == on_disk and second["runs"] == on_disk["runs"]

    # and at the same moment: two writers of 20 runs each (seeds 0-19 and 20-39), 40 recorded
    def writer(seeds: range) -> None:
        record = ev.load_record(path)
        for seed in seeds:
            ev.merge_record(record, path, (size, "drloc", seed), fake_result(size, "drloc", seed))

    threads = [threading.Thread(target=writer, args=(range(k, k + 20),)) for k in (0, 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = json.loads(path.read_text())["runs"]
    assert sorted(r["seed"] for r in runs if r["arm"] == "drloc") == list(range(40))
    assert len(runs) == 42


def test_record_of_another_protocol_is_refused(ev, tmp_path, monkeypatch) -> None:
    path = tmp_path / "record.json"
    ev.save_record(ev.load_record(path), path)
    assert ev.load_record(path)["runs"] == []
    monkeypatch.setattr(ev, "VAL_FRACTION", 0.3)
    with pytest.raises(ValueError, match="val_fraction"):
        ev.load_record(path)


def test_drloc_arms_use_the_benchmark_rule_at_the_14x14_grid(ev) -> None:
    # the reference λ 0.1 times gh / 2 (drloc_loss's scale note), gh = 14 for every arm's model
    for name in (ev.VIT, ev.CONV_STEM, ev.CONVIT):
        grid = create_model(name, num_classes=10, in_chans=1).patch_embed.grid_size
        assert tuple(grid) == (ev.GRID_SIDE, ev.GRID_SIDE)
    table = ev.arms()
    assert table["drloc"]["drloc"] == {"weight": pytest.approx(0.1 * 14 / 2)}
    assert table["drloc"]["se"]["weight"] == 0.0
    assert table["se_drloc"]["se"]["weight"] == 0.01


def result(n, arm, seed, top1, jaccard) -> dict:
    return {"n_per_class": n, "epochs": 9, "arm": arm, "seed": seed, "steps": 9, "top1": top1,
            "train_top1": 100.0, "gap": 100.0 - top1, "jaccard": jaccard, "se_mean": 0.2,
            "regions_mean": 2.0}  # fmt: skip


def test_hypothesis_verdicts_by_hand(ev, tmp_path) -> None:
    runs = []
    for seed, base in enumerate((40.0, 42.0, 44.0)):  # baseline seed std 2
        runs.append(result(50, "baseline", seed, base, 0.30))
        # se: +3 every seed (interval [+3, +3]: H1 held, but 3 < 2 x 2: no "gain > 2 sd")
        runs.append(result(50, "se", seed, base + 3, (0.31, 0.29, 0.30)[seed]))
        runs.append(result(50, "convit", seed, base + 4, None))  # se - convit = -1: failed
        # se - conv_stem = 0, +1, -1: mean 0, "at least as good": held
        runs.append(result(50, "conv_stem", seed, base + (3, 2, 4)[seed], 0.3))
    runs += [result(100, "baseline", 0, 50.0, 0.3), result(100, "se", 0, 51.0, 0.3)]
    verdicts = {(name, n): (verdict, evidence) for name, n, verdict, evidence in
                ev.hypotheses(runs)}  # fmt: skip
    assert verdicts[("H1", 50)][0] == "held"
    assert "[+3.0, +3.0]" in verdicts[("H1", 50)][1]
    assert verdicts[("H1", 50)][1].endswith("(4.0)? False")
    assert verdicts[("H2 vs convit", 50)][0] == "failed"
    assert verdicts[("H2 vs conv_stem", 50)][0] == "held"
    # Δ Jaccard +0.01, -0.01, 0: interval around 0
    assert verdicts[("H3", 50)][0] == "inconclusive"
    assert verdicts[("H1", 100)] == ("not evaluable", "1 paired seed(s)")
    text = ev.report({"pilot": {}, "runs": runs})
    assert "| 50 | convit | 3 | 9 | 9 | 46.0 ± 2.0 | 100.0 ± 0.0 | 54.0 ± 2.0 | n/a |" in text
    # 8 arms x 5 seeds per size; 4 arms on 3 seeds at n = 50, 2 runs at n = 100
    pilots = {"50": {}, "100": {}}
    assert ev.progress_lines({"pilot": pilots, "runs": runs}) == [
        "- n = 50/class: 12 of 40 runs (8 arms x 5 seeds); seeds with every arm: none",
        "- n = 100/class: 2 of 40 runs (8 arms x 5 seeds); seeds with every arm: none",
    ]
    # the 4 arms seed 1 lacks: it then has every arm (12 + 4 runs)
    every = [result(50, arm, 1, 40.0, 0.3) for arm in ev.arms()]
    assert ev.progress_lines({"pilot": {"50": {}}, "runs": runs + every})[0].endswith(
        "16 of 40 runs (8 arms x 5 seeds); seeds with every arm: 1"
    )
    assert "- H1, n = 50: **held**" in text
    # the pairs, seed by seed: +3 points every seed, Jaccard +0.01, -0.01, 0; n = 100's one pair
    assert "| 50 | 1 | 42.00 | 45.00 | +3.00 | 0.300 | 0.290 | -0.010 |" in text
    assert "| 100 | 0 | 50.00 | 51.00 | +1.00 | 0.300 | 0.300 | +0.000 |" in text
    ev.write_report({"pilot": {}, "runs": runs}, tmp_path / "record.json")
    assert (tmp_path / "record.md").read_text() == text + "\n"
    assert (tmp_path / "record.png").stat().st_size > 0


def test_seed_table_by_hand(ev) -> None:
    runs = [result(50, "baseline", 0, 40.0, 0.30), result(50, "conv_stem", 0, 55.5, 0.25),
            result(50, "se", 1, 41.0, 0.35), result(100, "baseline", 0, 50.0, None),
            result(100, "se", 0, 48.75, 0.20)]  # fmt: skip
    # columns: the arms with runs, in the protocol's order (se before conv_stem); seed 1 at 50
    # has no baseline (no bracket), n = 100's baseline no Jaccard (neither value nor bracket)
    assert ev.seed_table(runs, "top1", "Test top-1 (%)", 2)[3:] == [
        "| n / class | seed | baseline | se | conv_stem |",
        "|---|---|---|---|---|",
        "| 50 | 0 | 40.00 | - | 55.50 (+15.50) |",
        "| 50 | 1 | - | 41.00 | - |",
        "| 100 | 0 | 50.00 | 48.75 (-1.25) | - |",
    ]
    assert ev.seed_table(runs, "jaccard", "Jaccard", 3)[-3:] == [
        "| 50 | 0 | 0.300 | - | 0.250 (-0.050) |",
        "| 50 | 1 | - | 0.350 | - |",
        "| 100 | 0 | - | 0.200 | - |",
    ]
    assert ev.seed_table([], "top1", "Test top-1 (%)", 2) == []


def test_paired_panel_draws_each_seeds_difference_and_the_t_interval(ev) -> None:
    """The plot's fourth panel, against hand-computed values: se - baseline on three seeds is
    +1, +2, 0 (mean 1, sd 1), so the paired 95 % interval is 1 ± t(0.975, 2) / sqrt(3) =
    1 ± 4.303 / 1.732 = [-1.484, +3.484]; an arm on one paired seed gets its dot, no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [result(50, "baseline", s, b, 0.2) for s, b in enumerate((30.0, 31.0, 32.0))]
    runs += [result(50, "se", s, t, 0.2) for s, t in enumerate((31.0, 33.0, 32.0))]
    runs.append(result(50, "convit", 0, 50.0, 0.3))
    fig, ax = plt.subplots()
    ev.paired_panel(ax, runs, ["baseline", "se", "convit"], "top1", "Δ")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["se", "convit"]
    dots = [line for line in ax.lines if line.get_marker() == "."]
    assert sorted(dots[0].get_ydata()) == [0.0, 1.0, 2.0]
    assert list(dots[0].get_xdata()) == [0, 0, 0]
    assert list(dots[1].get_ydata()) == [20.0] and list(dots[1].get_xdata()) == [1]
    (bar,) = ax.containers  # one error bar: convit has a single paired seed
    (segment,) = bar.lines[2][0].get_segments()
    assert segment[0][1] == pytest.approx(1 - 4.302653 / 3**0.5, abs=1e-4)
    assert segment[1][1] == pytest.approx(1 + 4.302653 / 3**0.5, abs=1e-4)
    plt.close(fig)


def test_seed_lines_means_cover_only_the_seeds_every_arm_has(ev) -> None:
    """The per-arm means of the plot's first panels are paired: with the baseline on seeds 0-4
    (10, 20, 30, 40, 50) and the conv stem on seeds 0-2 (1, 2, 3), the baseline's mean is over
    seeds 0-2, (10 + 20 + 30) / 3 = 20, not 30 over all five, and the legend says so; an arm
    without runs gets no mean. With every arm on the same seeds the legend is the plain one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [result(100, "baseline", s, 10.0 * (s + 1), 0.2) for s in range(5)]
    runs += [result(100, "conv_stem", s, float(s + 1), 0.2) for s in range(3)]
    fig, ax = plt.subplots()
    ev.seed_lines(ax, runs, ["baseline", "convit", "conv_stem"], "top1", "top-1")
    (means,) = [line for line in ax.lines if line.get_marker() == "o"]
    assert list(means.get_xdata()) == [0, 2]
    assert list(means.get_ydata()) == pytest.approx([20.0, 2.0])
    assert means.get_label() == "mean over the 3 seeds every arm has"
    fig2, ax2 = plt.subplots()
    ev.seed_lines(ax2, runs[:3] + runs[5:], ["baseline", "conv_stem"], "top1", "top-1")
    (means,) = [line for line in ax2.lines if line.get_marker() == "o"]
    assert list(means.get_ydata()) == pytest.approx([20.0, 2.0])
    assert means.get_label() == "mean over seeds"
    plt.close(fig)
    plt.close(fig2)


@pytest.fixture
def tiny_pilot(ev, tmp_path, monkeypatch):
    """The pilot on a tiny model and data set: 130 training images (2 steps of 64 an epoch), 8
    epochs, the training subset evaluated every epoch, trained 2 epochs per chunk; no plateau
    stop (tolerance -1: the mean loss would have to double)."""
    recipe = ev.recipe
    options = {"train_per_class": 20, "test_size": 30, "cache_dir": str(tmp_path / "data")}

    def tiny_recipe(*args, **kwargs):
        return recipe(*args, **kwargs) | {"data_options": options, "model_kwargs": {"depth": 2}}

    monkeypatch.setattr(ev, "recipe", tiny_recipe)
    monkeypatch.setattr(ev, "VIT", "se_vit_tiny_patch4_32")
    monkeypatch.setattr(ev, "IMG_SIZE", 16)
    monkeypatch.setattr(ev, "PILOT_EVALS", 8)
    monkeypatch.setattr(ev, "PLATEAU_TOLERANCE", -1.0)

    def pilot(name: str, chunk_evals: int, target: float) -> dict:
        monkeypatch.setattr(ev, "PILOT_CHUNK_EVALS", chunk_evals)
        monkeypatch.setattr(ev, "TRAIN_TOP1_TARGET", target)
        return ev.run_pilot(ev.Size(13, 8, 1), tmp_path / name, "cpu")

    return pilot


@pytest.mark.slow
def test_chunked_pilot_equals_the_uninterrupted_one(ev, tiny_pilot, tmp_path) -> None:
    whole = tiny_pilot("whole", chunk_evals=100, target=101.0)  # one chunk: the plain run
    chunked = tiny_pilot("chunked", chunk_evals=2, target=101.0)  # 4 chunks, 3 resumes
    assert whole["trained_epochs"] == chunked["trained_epochs"] == 8
    assert whole["steps"] == chunked["steps"] == 16
    assert chunked["log"] == whole["log"]  # losses and training top-1, every epoch, exactly
    assert (chunked["epochs"], chunked["reason"]) == (8, ev.choose_epochs(whole["log"], 8)[1])
    weights = [load_file(tmp_path / name / "pilot" / "n13_e8" / "model.safetensors")
               for name in ("whole", "chunked")]  # fmt: skip
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_pilot_stops_once_decided_with_the_whole_pilots_choice(ev, tiny_pilot) -> None:
    whole = tiny_pilot("whole", chunk_evals=100, target=101.0)
    evaluated = [row["train_top1"] for row in whole["log"]]
    assert all(top1 is not None for top1 in evaluated)
    target = max(evaluated[:3])  # reached at epoch 1, 2 or 3: decided in the first 2 chunks
    decided = ev.choose_epochs(whole["log"], 8)
    early = tiny_pilot("early", chunk_evals=2, target=target)
    chosen = ev.choose_epochs(whole["log"], 8)  # the constants as run_pilot saw them
    assert chosen[0] <= 3 and decided[0] == 8
    assert (early["epochs"], early["reason"]) == chosen
    # stopped at the end of the chunk that decided, not after the pilot's 8 epochs
    assert early["trained_epochs"] == 2 * ((chosen[0] + 1) // 2) < 8
    assert early["log"] == whole["log"][: early["trained_epochs"]]


def _cut_before_first_checkpoint(run_dir: Path) -> None:
    """Leave ``run_dir`` as a run killed before its first checkpoint leaves it: the config."""
    for path in list(run_dir.rglob("*"))[::-1]:
        if path.name != "config.yaml":
            path.rmdir() if path.is_dir() else path.unlink()
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]


@pytest.mark.slow
def test_a_pilot_cut_off_before_its_first_checkpoint_starts_again(ev, tiny_pilot, tmp_path):
    whole = tiny_pilot("whole", chunk_evals=100, target=101.0)
    _cut_before_first_checkpoint(tmp_path / "whole" / "pilot" / "n13_e8")
    again = tiny_pilot("whole", chunk_evals=100, target=101.0)  # was: FileExistsError
    assert again["log"] == whole["log"] and again["steps"] == whole["steps"] == 16


@pytest.mark.slow
def test_an_arms_run_cut_off_before_its_first_checkpoint_starts_again(
    ev, tiny_pilot, tmp_path
) -> None:
    # a session's end killed the run within its first epoch (2026-11-30: se_drloc seed 3);
    # tiny_pilot's patches give the tiny recipe (130 images, 2 steps an epoch)
    size = ev.Size(13, 3, 1)
    config = ev.config_for(size, "baseline", 0, "cpu")
    run_dir = ev.run_dir_of(size, "baseline", 0, tmp_path / "runs")
    whole = ev._train(config, run_dir)
    _cut_before_first_checkpoint(run_dir)
    again = ev._train(config, run_dir)  # was: FileExistsError, the run not recorded
    assert again["steps"] == whole["steps"] == 6 and again["top1"] == whole["top1"]
    assert (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize(
    "flags, expected",
    [
        # one round: the missing pilot first, with the recorded size's run; then the new
        # size's run
        ((), [(100, "pilot", 0), (50, "baseline", 0), (100, "baseline", 0)]),
        # the pilot alone: neither size's runs start (not the recorded size's, nor the new
        # size's once its pilot is in)
        (("--pilots-only",), [(100, "pilot", 0)]),
    ],
)
def test_pilot_runs_beside_the_sizes_that_have_one_then_its_runs_follow(
    ev, tmp_path, monkeypatch, flags, expected
) -> None:
    results = record_with_pilot_50(ev, tmp_path / "record.json")
    calls = []

    def fake_run_arm(size, arm, seed, work_dir, variant, device, speed=None, selections=None):
        calls.append((size.n_per_class, arm, seed))
        return fake_result(size, arm, seed)

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    monkeypatch.setattr(sys, "argv", ["evidence_v2", "--arms", "baseline", "--seeds", "1",
                                      *flags, "--results", str(results),
                                      "--work-dir", str(tmp_path / "w")])  # fmt: skip
    ev.main()
    assert calls == expected
    assert set(json.loads(results.read_text())["pilot"]) == {"50", "100"}


def test_cpu_and_gpu_runs_go_to_separate_records_by_default(ev, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ev, "RESULTS", tmp_path / "gpu.json")
    monkeypatch.setattr(ev, "RESULTS_CPU", tmp_path / "cpu.json")
    monkeypatch.setattr(ev, "device_name", lambda device: device)  # no GPU here
    monkeypatch.setattr(
        ev, "run_arm", lambda size, arm, seed, *rest, **kw: fake_result(size, arm, seed)
    )
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(sys, "argv", ["evidence_v2", "--sizes", "50", "--arms", "baseline",
                                          "--seeds", "1", "--device", device,
                                          "--work-dir", str(tmp_path / device)])  # fmt: skip
        ev.main()
    for name in ("cpu.json", "gpu.json"):
        record = json.loads((tmp_path / name).read_text())
        assert [r["arm"] for r in record["runs"]] == ["baseline"] and "50" in record["pilot"]
    # a smoke test's shortened pilot may write to neither
    monkeypatch.setattr(sys, "argv", ["evidence_v2", "--pilot-epochs", "1", "--device", "cpu"])
    with pytest.raises(SystemExit):
        ev.main()


def test_a_records_runs_default_to_a_directory_named_after_it(ev, tmp_path, monkeypatch) -> None:
    # the README's plan command gives no --work-dir, and its attention_mass command reads the
    # CPU record's runs from runs/evidence_v2_cpu
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "RESULTS", tmp_path / "evidence_v2.json")
    monkeypatch.setattr(ev, "RESULTS_CPU", tmp_path / "evidence_v2_cpu.json")
    monkeypatch.setattr(ev, "device_name", lambda device: device)  # no GPU here
    work_dirs = set()

    def fake_run_arm(size, arm, seed, work_dir, *rest, **kw):
        work_dirs.add(work_dir)
        return fake_result(size, arm, seed)

    monkeypatch.setattr(ev, "run_arm", fake_run_arm)
    expected = {
        "cpu": {Path("runs/evidence_v2_cpu")},
        "cuda": {Path("runs/evidence_v2")},
        "scratch": {Path("runs/mine")},
    }
    for name, flags in (("cpu", []), ("cuda", ["--device", "cuda"]),
                        ("scratch", ["--results", str(tmp_path / "x" / "mine.json")])):  # fmt: skip
        work_dirs.clear()
        monkeypatch.setattr(sys, "argv", ["evidence_v2", "--sizes", "50", "--arms", "baseline",
                                          "--seeds", "1", *flags])  # fmt: skip
        ev.main()
        assert work_dirs == expected[name]


def test_cost_lines_by_hand(ev) -> None:
    def run(device, seconds, steps, jobs=None, model="m", threads=None):
        r = {"device": device, "train_time_s": seconds, "steps": steps, "model": model}
        execution = {"jobs": jobs} | ({"threads": threads} if threads else {})
        return r | ({"execution": execution} if jobs else {})

    record = {
        "pilot": {"50": run("gpu", 100.0, 1000, jobs=8)},
        "selection": [run("gpu", 60.0, 200, jobs=8)],
        "runs": [run("gpu", 40.0, 200, jobs=8), run("gpu", 10.0, 200, jobs=2),
                 run("cpu", 300.0, 200),
                 # the same arrangement with other threads is another line: 1 job of 2
                 # threads (0.7 s) against 2 jobs of 1 thread (2.4 s, 2.2 s: median 2.3)
                 run("cpu", 140.0, 200, jobs=1, threads=2),
                 run("cpu", 480.0, 200, jobs=2, threads=1),
                 run("cpu", 440.0, 200, jobs=2, threads=1),
                 # two copies of one group: 80 s for 200 steps of both, 0.2 s a copy's step
                 *[run("gpu", 80.0, 200, jobs=2) | {"group": {"copies": 2, "index": i}}
                   for i in (0, 1)],
                 # the same with the fused attention kernel: 40 s, 0.1 s a copy's step
                 *[run("gpu", 40.0, 200, jobs=2)
                   | {"group": {"copies": 2, "index": i},
                      "execution": {"jobs": 2, "fused_attention": True}} for i in (0, 1)]],
    }  # fmt: skip
    assert ev.cost_lines(record)[3:] == [
        "- cpu, 1 side by side, 2 threads each, m: 0.700 s (1 runs)",
        "- cpu, 2 side by side, 1 thread each, m: 2.300 s (2 runs)",
        "- cpu, ? side by side, m: 1.500 s (1 runs)",
        "- gpu, 2 side by side, m: 0.050 s (1 runs)",
        "- gpu, 2 side by side, 2 as one step, m: 0.200 s (2 runs)",
        "- gpu, 2 side by side, 2 as one step (fused attention), m: 0.100 s (2 runs)",
        "- gpu, 8 side by side, m: 0.200 s (3 runs)",  # median of 0.1, 0.3, 0.2
    ]
    assert ev.cost_lines({"pilot": {}, "runs": []}) == []


def test_group_units_merge_each_group_of_a_seed_and_size(ev) -> None:
    s50, s100 = ev.Size(50, 400, 5), ev.Size(100, 400, 5)
    runs = [(s50, "baseline", 0), (s50, "se", 0), (s50, "se_no_last_skip", 0),
            (s50, "drloc", 0), (s50, "se_val@0.01", 0), (s50, "se_val@0.1", 0),
            (s100, "baseline", 0), (s100, "se_val@0.03", 0), (s50, "se", 1),
            (s50, "drloc", 1)]  # fmt: skip
    assert [(s.n_per_class, a, k) for s, a, k in ev.group_units(runs)] == [
        (50, "group:baseline+se+drloc", 0),
        (50, "se_no_last_skip", 0),
        (50, "group:se_val@0.01+se_val@0.1", 0),
        (100, "baseline", 0),  # alone in its group at that size: trained as a plain run
        (100, "se_val@0.03", 0),
        (50, "group:se+drloc", 1),
    ]
    order = sorted(ev.group_units(runs), key=ev.seed_order(list(ev.arms())))
    assert [a for _, a, _ in order][:3] == [
        "group:baseline+se+drloc",
        "se_no_last_skip",
        "group:se_val@0.01+se_val@0.1",
    ]


@pytest.mark.slow
def test_a_group_unit_trains_its_runs_together_and_records_each(
    ev, tiny_pilot, tmp_path, monkeypatch
) -> None:
    size = ev.Size(13, 2, 1)
    work = tmp_path / "work"
    # se was begun alone (it has a checkpoint): it resumes alone, the others train as a group
    begun = dataclasses.replace(ev.config_for(size, "se", 0, "cpu"), max_steps=1)
    ev.train(begun, ev.run_dir_of(size, "se", 0, work))
    for name in ("metrics.json", "model.safetensors"):  # as if killed after its checkpoint
        (ev.run_dir_of(size, "se", 0, work) / name).unlink()
    grouped, train_group = [], ev.train_group

    def spy(configs, dirs, **kwargs):
        grouped.append(dirs)
        fused.append(kwargs.get("fused_attention"))
        return train_group(configs, dirs, **kwargs)

    fused = []
    monkeypatch.setattr(ev, "train_group", spy)
    # a speed key of groups (not a config key) reaches the group, and not the run alone
    speed = {"num_workers": 0, "fused_attention": True}
    results = ev.run_arm(size, "group:baseline+se+drloc", 0, work, ev.Variant(), "cpu", speed)
    assert [r["arm"] for r in results] == ["baseline", "se", "drloc"]
    assert grouped == [[ev.run_dir_of(size, a, 0, work) for a in ("baseline", "drloc")]]
    assert fused == [True]
    assert [r.get("group") for r in results] == [
        {"copies": 2, "index": 0},
        None,
        {"copies": 2, "index": 1},
    ]
    assert results[0]["steps"] == results[1]["steps"] == results[2]["steps"] > 1
    for r in results:
        assert 0 <= r["top1"] <= 100 and 0 <= r["train_top1"] <= 100
        assert r["jaccard"] is not None
    # a second call reads the results back: nothing trains again
    assert ev.run_arm(size, "group:baseline+se+drloc", 0, work, ev.Variant(), "cpu") == results
    assert len(grouped) == 1


def test_a_units_expected_seconds_by_hand(ev) -> None:
    # 500 images at batch 64: 7 full steps an epoch; 1,000 images: 15
    assert ev.expected_seconds((ev.Size(50, 400, 5), "baseline", 0), 0.1) == pytest.approx(
        ev.RUN_OVERHEAD_S + 400 * 7 * 0.1
    )
    group = (ev.Size(100, 400, 5), "group:baseline+se", 1)  # a group step counts once
    assert ev.expected_seconds(group, 0.2) == pytest.approx(ev.RUN_OVERHEAD_S + 400 * 15 * 0.2)
    # a selection run trains on the 40 images per class that the carve leaves: 400 // 64 = 6
    # full steps an epoch (the recorded ones: 2,400 steps), alone or as a group
    size = ev.Size(50, 400, 5)
    for unit in ((size, "se_val@0.1", 1), (size, "group:se_val@0.01+se_val@0.03+se_val@0.1", 1)):
        assert ev.expected_seconds(unit, 0.1) == pytest.approx(ev.RUN_OVERHEAD_S + 400 * 6 * 0.1)


def test_a_selection_runs_steps_left_by_hand(ev, tmp_path) -> None:
    work, size = tmp_path / "w", ev.Size(50, 400, 5)
    run = (size, "se_val@0.03", 2)
    _checkpoint_at(ev.run_dir_of(size, "se_val@0.03", 2, work), 1800)
    assert ev.steps_left(run, work) == 2400 - 1800
    assert ev.begun(run, work)
    _checkpoint_at(ev.run_dir_of(size, "se_val@0.03", 2, work), 2400)  # trained, not evaluated
    assert ev.steps_left(run, work) == 0 and not ev.begun(run, work)


def _checkpoint_at(run_dir, step: int) -> None:
    """The files a run's checkpoint at ``step`` leaves (contents do not matter here)."""
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".pt", ".safetensors"):
        (directory / f"step_{step:08d}{suffix}").write_bytes(b"")
    (directory / "latest").write_text(f"step_{step:08d}")


def test_steps_left_after_what_checkpoints_hold_by_hand(ev, tmp_path) -> None:
    work, size, full = tmp_path / "w", ev.Size(50, 400, 5), 400 * 7
    assert ev.steps_left((size, "se", 0), work) == full  # nothing begun
    _checkpoint_at(ev.run_dir_of(size, "se", 0, work), 1400)
    assert ev.steps_left((size, "se", 0), work) == full - 1400
    assert ev.expected_seconds((size, "se", 0), 0.1, work) == pytest.approx(
        ev.RUN_OVERHEAD_S + 1400 * 0.1
    )
    finished = ev.run_dir_of(size, "baseline", 0, work)
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text("{}")
    assert ev.steps_left((size, "baseline", 0), work) == 0
    # a group unit: baseline finished, se begun alone (1,400 left), drloc and se_drloc as a
    # group whose checkpoint holds 2,100 steps (700 left); se resumes alone after the group
    unit = (size, "group:baseline+se+drloc+se_drloc", 0)
    arms, checkpoint = ev.group_members(*unit, work)
    assert arms == ["drloc", "se_drloc"]
    assert ev.steps_left(unit, work) == 1400 + full
    checkpoint.parent.mkdir(parents=True)
    torch.save({"step": 2100}, checkpoint)
    assert ev.steps_left(unit, work) == 1400 + 700
    # a second call resumes what has checkpoints whatever the time left, and no other unit
    assert ev.expected_seconds((size, "se", 0), 0.1, work, resume_begun=True) == 0.0
    assert ev.expected_seconds(unit, 0.1, work, resume_begun=True) == 0.0
    fresh = (size, "conv_stem", 0)
    assert not ev.begun(fresh, work) and not ev.begun((size, "baseline", 0), work)
    assert ev.expected_seconds(fresh, 0.1, work, resume_begun=True) == pytest.approx(
        ev.RUN_OVERHEAD_S + full * 0.1
    )
    # a pilot writes metrics after each chunk: only its checkpoints count (15 steps an epoch)
    pilot = ev.Size(100, 400, 1)
    pilot_dir = work / "pilot" / "n100_e400"
    _checkpoint_at(pilot_dir, 3000)
    (pilot_dir / "metrics.json").write_text("{}")
    assert ev.steps_left((pilot, "pilot", 0), work) == 400 * 15 - 3000


def test_step_costs_and_a_costly_arms_expected_seconds_by_hand(ev) -> None:
    def run(arm, seconds, steps=100, **extra):
        return {"arm": arm, "train_time_s": seconds, "steps": steps} | extra

    record = {"runs": [
        run("baseline", 100.0), run("baseline", 120.0), run("baseline", 400.0),  # median 1.2/step
        run("convit", 360.0), run("convit", 420.0, steps=200),  # 3.6 and 2.1 s/step: median 2.85
        run("se", 1.0, group="group:baseline+se"),  # the group's time: not counted
        run("se_val", 1.0, same_run_as="se"),  # another arm's run: not counted
    ]}  # fmt: skip
    costs = ev.step_costs(record)
    assert costs == pytest.approx({"baseline": 1.0, "convit": 2.85 / 1.2})
    size = ev.Size(50, 400, 5)  # 2,800 steps
    assert ev.expected_seconds((size, "convit", 1), 0.5, costs=costs) == pytest.approx(
        ev.RUN_OVERHEAD_S + 2800 * 0.5 * 2.85 / 1.2
    )
    for unknown in ("se", "group:baseline+se", "pilot"):  # no measured cost: the baseline's
        assert ev.expected_seconds((size, unknown, 1), 0.5, costs=costs) == pytest.approx(
            ev.RUN_OVERHEAD_S + 2800 * 0.5
        )
    # without a baseline run there is nothing to be relative to
    assert ev.step_costs({"runs": [run("convit", 360.0)]}) == {}


def test_a_run_too_costly_for_the_time_budget_is_not_started(
    ev, tmp_path, monkeypatch, capsys
) -> None:
    results = record_with_pilot_50(ev, tmp_path / "record.json")
    record = ev.load_record(results)
    for arm, seconds in (("baseline", 49.0), ("convit", 49.0 * 3.4)):  # 49 steps at 7 epochs
        record["runs"].append(fake_result(ev.Size(50, 7, 5), arm, 0) | {
            "steps": 49, "train_time_s": seconds})  # fmt: skip
    ev.save_record(record, results)
    calls = []
    monkeypatch.setattr(ev, "run_arm", lambda size, arm, seed, *rest, **kw: calls.append(
        (arm, seed)) or fake_result(size, arm, seed))  # fmt: skip
    # 2 minutes at 1 s per baseline step: seed 1's baseline needs 30 + 49 s, its ConViT
    # 30 + 49 * 3.4 = 197 s
    monkeypatch.setattr(sys, "argv", ["evidence_v2", "--sizes", "50", "--arms", "baseline",
                                      "convit", "--seeds", "2", "--results", str(results),
                                      "--time-budget", "2", "--step-seconds", "1",
                                      "--work-dir", str(tmp_path / "w")])  # fmt: skip
    ev.main()
    assert calls == [("baseline", 1)]
    assert "n=50 convit seed 1: not started, expected 3 min, 2 left" in capsys.readouterr().out
