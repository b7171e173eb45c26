"""benchmarks/loss_speed.py: its authors'-style baseline is right and every path of it runs."""

from __future__ import annotations

import json

import pytest
import torch

from spatial_entropy import reference_spatial_entropy
from test_components import ADVERSARIAL


@pytest.fixture(scope="module")
def loss_speed(load_benchmark):
    return load_benchmark("loss_speed")


def test_authors_style_baseline_equals_the_reference(loss_speed) -> None:
    logits = loss_speed.smooth_logits(3, 4, (7, 9), seed=2)
    logits[0, 0] = torch.where(ADVERSARIAL["checkerboard"][:7, :9], 1.0, -1.0).reshape(-1)
    logits[0, 1] = 0.0  # constant map: no foreground
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    ours = loss_speed.authors_style_spatial_entropy(x, (7, 9))
    expected = reference_spatial_entropy(y, (7, 9))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    ours.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_cpu_run_with_tiny_settings_writes_every_row(loss_speed, tmp_path) -> None:
    out = tmp_path / "speed.json"
    argv = ["--shapes", "1", "--repeats", "1", "--reference-repeats", "1", "--alternatives"]
    argv += ["--no-model-logits", "--step-batch", "2", "--models", "--out", str(out)]
    loss_speed.main(argv)
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    for key in ("reference_ms", "authors_ms", "ours_ms", "closure_ms", "propagate_ms"):
        assert row[key] > 0
    (step,) = result["train_steps"]
    assert step["model"] == "se_vit_small_patch8_64" and step["batch"] == 2
    assert step["step_ms_with_se"] > 0 and step["step_ms_without_se"] > 0
