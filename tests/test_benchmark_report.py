"""The data-efficiency benchmark's bookkeeping: variants, run order, statistics, tables."""

from __future__ import annotations

import json
import math
import sys

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("data_efficiency")


def result(n: int, arm: str, seed: int, top1: float, jaccard: float = 0.3) -> dict:
    return {"n_per_class": n, "arm": arm, "seed": seed, "steps": 10, "top1": top1,
            "jaccard": jaccard, "se_mean": 0.2, "regions_mean": 2.0}  # fmt: skip


def test_paired_interval_by_hand(bench) -> None:
    # differences 1, 2, 3: mean 2, std 1, t(0.975, 2 dof) = 4.302653
    low, high = bench.paired_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert low == pytest.approx(2 - half, abs=1e-5)
    assert high == pytest.approx(2 + half, abs=1e-5)


def test_variant_names_and_recipe(bench) -> None:
    size = bench.Size(50, 50, 5)
    assert bench.Variant().suffix() == ""
    variant = bench.Variant(epochs_scale=4, img_size=112, distractors=0)
    assert variant.suffix() == "_x4epochs_img112_distractors0"
    values = bench.recipe(size, 3, variant, "cuda")
    assert values["epochs"] == 200 and values["eval_every"] == 200
    assert values["warmup_epochs"] == 20
    assert values["img_size"] == 112 and values["data_options"] == {"distractors": 0}
    assert values["device"] == "cuda" and values["seed"] == 3
    plain = bench.recipe(size, 0)
    assert plain["epochs"] == 50 and "img_size" not in plain and "data_options" not in plain


def test_tables_verdict_and_pairing(bench) -> None:
    # baseline 10, 12, 14 (std 2); arm "se" 20, 22, 24: +10 on every seed, far above 2 x 2
    runs = [result(50, "baseline", s, 10 + 2 * s) for s in range(3)]
    runs += [result(50, "se", s, 20 + 2 * s, jaccard=0.4) for s in range(3)]
    # a small arm: +1 each seed, below 2 sigma; an unpaired seed 7 must be left out
    runs += [result(50, "se_no_last_skip", s, 11 + 2 * s) for s in range(3)]
    runs += [result(50, "se_no_last_skip", 7, 99.0)]
    text = bench.tables(runs)
    se_row = next(line for line in text.splitlines() if line.startswith("| 50 | se | 3 | +10.0"))
    assert "| 4.0 | yes | [+10.0, +10.0] | +0.100 ± 0.000 |" in se_row
    nls_row = next(
        line for line in text.splitlines() if line.startswith("| 50 | se_no_last_skip | 3 |")
    )
    assert "+1.0 ± 0.0 | 4.0 | no |" in nls_row
    # the mean table counts all four seeds of the unpaired arm
    assert "| 50 | se_no_last_skip | 4 | 10 |" in text


def test_execute_order_and_time_budget(bench, tmp_path, monkeypatch) -> None:
    calls = []

    def fake_run_one(size, arm, seed, work_dir, variant, device):
        calls.append((size.n_per_class, arm, seed))
        return result(size.n_per_class, arm, seed, 50.0)

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    plan = bench.Plan((bench.Size(50, 1, 2), bench.Size(100, 1, 2)), ["baseline", "se"], False)
    left = bench.execute(plan.runs, tmp_path, variant=bench.Variant(), device="cpu", jobs=1,
                         threads=None, time_budget_s=None)  # fmt: skip
    assert left == 0
    # seed-major within a size, arms in their declared order
    assert calls == [
        (50, "baseline", 0),
        (50, "se", 0),
        (50, "baseline", 1),
        (50, "se", 1),
        (100, "baseline", 0),
        (100, "se", 0),
        (100, "baseline", 1),
        (100, "se", 1),
    ]
    calls.clear()
    left = bench.execute(plan.runs, tmp_path, variant=bench.Variant(), device="cpu", jobs=1,
                         threads=None, time_budget_s=0)  # fmt: skip
    assert left == len(plan.runs) and calls == []


def test_execute_starts_only_runs_expected_to_finish_in_the_budget(bench, tmp_path, monkeypatch):
    # a clock that each run advances by its own length: n = 100 runs take 60 s, n = 50 runs 20 s
    clock = {"now": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    seconds = {50: 20.0, 100: 60.0}
    calls = []

    def run_fn(size, arm, seed, work_dir, variant, device):
        calls.append((size.n_per_class, arm, seed))
        clock["now"] += seconds[size.n_per_class]
        return result(size.n_per_class, arm, seed, 50.0)

    plan = bench.Plan((bench.Size(100, 1, 1), bench.Size(50, 1, 2)), ["baseline", "se"], False)
    left = bench.execute(plan.runs, tmp_path, variant=bench.Variant(), device="cpu", jobs=1,
                         threads=None, time_budget_s=100, run_fn=run_fn,
                         duration=lambda run: seconds[run[0].n_per_class])  # fmt: skip
    # in order: n = 50 seed 0 (20 s), seed 1's two (40 s) ... the n = 100 runs come after, at
    # 80 s of 100 neither fits (60 s) though time is left, and no run is cut off
    assert calls == [(50, "baseline", 0), (50, "se", 0), (50, "baseline", 1), (50, "se", 1)]
    assert left == 2 and clock["now"] == 80.0
    # without the estimate the first n = 100 run would start at 80 s and end past the budget
    calls.clear()
    clock["now"] = 0.0
    bench.execute(plan.runs, tmp_path, variant=bench.Variant(), device="cpu", jobs=1,
                  threads=None, time_budget_s=100, run_fn=run_fn)  # fmt: skip
    assert calls[-1] == (100, "baseline", 0) and clock["now"] == 140.0


def test_a_failed_run_is_reported_and_the_others_go_on(bench, tmp_path, capsys) -> None:
    recorded = []

    def run_fn(size, arm, seed, work_dir, variant, device):
        if arm == "se" and seed == 0:
            raise RuntimeError("CUDA error: out of memory")
        return result(size.n_per_class, arm, seed, 50.0)

    plan = bench.Plan((bench.Size(50, 1, 2),), ["baseline", "se"], False)
    left = bench.execute(plan.runs, tmp_path, variant=bench.Variant(), device="cpu", jobs=1,
                         threads=None, time_budget_s=None, run_fn=run_fn,
                         on_result=lambda run, res: recorded.append(run[1:]))  # fmt: skip
    assert left == 0
    assert recorded == [("baseline", 0), ("baseline", 1), ("se", 1)]
    out = capsys.readouterr().out
    assert "n=50 se seed 0 FAILED (not recorded): RuntimeError: CUDA error: out of memory" in out


def test_report_rebuilds_tables_from_json(bench, tmp_path, monkeypatch) -> None:
    record = {"variant": {"epochs_scale": 4, "img_size": None, "distractors": None},
              "runs": [result(50, "baseline", s, 30.0 + s) for s in range(2)]
              + [result(50, "se", s, 32.0 + s) for s in range(2)]}  # fmt: skip
    path = tmp_path / "lever.json"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(sys, "argv", ["data_efficiency.py", "--report", str(path)])
    bench.main()
    text = (tmp_path / "lever.md").read_text()
    assert "| 50 | se | 2 | +2.0 ± 0.0 |" in text
    assert (tmp_path / "lever.png").stat().st_size > 0
    assert not (tmp_path / "lever_lambda.png").exists()  # no constant-λ arm, no λ picture


def test_lambda_picture_only_with_constant_arms(bench, tmp_path) -> None:
    runs = [result(50, "baseline", s, 30.0 + s) for s in range(2)]
    assert bench.plot_lambda(runs, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    runs += [result(50, f"se_const_{w:g}", s, 29.0) for w in bench.LAMBDAS for s in range(2)]
    assert bench.plot_lambda(runs, tmp_path / "lambda.png") is True
    assert (tmp_path / "lambda.png").stat().st_size > 0


def test_drloc_arms_are_valid_configs_scaled_to_the_benchmark_grid(bench) -> None:
    from spatial_entropy.config import load_config
    from spatial_entropy.engine import build_regularizers
    from spatial_entropy.models import create_model

    # λ = reference 0.1 x gh / 2 (drloc_loss's scale note), gh the benchmark model's grid side
    grid = create_model(bench.MODEL, num_classes=10, in_chans=1).patch_embed.grid_size
    assert bench.DRLOC_WEIGHT == pytest.approx(0.1 * grid[0] / 2) and grid[0] == grid[1]
    recipe = bench.recipe(bench.Size(50, 50, 5), 0)
    names = {arm: [r.name for r in build_regularizers(load_config(values=recipe | bench.ARMS[arm]))]
             for arm in ("baseline", "se", "drloc", "se_drloc")}  # fmt: skip
    assert names == {"baseline": [], "se": ["se"], "drloc": ["drloc"], "se_drloc": ["se", "drloc"]}
    assert bench.ARMS["se_drloc"]["se"] == bench.ARMS["se"]["se"]
