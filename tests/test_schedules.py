"""The λ schedules of the spatial-entropy term: endpoints and shape."""

from __future__ import annotations

import math

import pytest

from spatial_entropy import se_weight


def test_constant() -> None:
    assert [se_weight(t, 30, weight=0.1, schedule="constant") for t in (0, 15, 30)] == [0.1] * 3


def test_published_schedule_endpoints() -> None:
    # Paper: λ = 0.01, linear warm-up over 10 epochs, cosine decay to 0 at the end.
    assert se_weight(0, 100, weight=0.01) == 0.0
    assert se_weight(5, 100, weight=0.01) == pytest.approx(0.005)
    assert se_weight(10, 100, weight=0.01) == pytest.approx(0.01)
    assert se_weight(55, 100, weight=0.01) == pytest.approx(0.005)
    assert se_weight(100, 100, weight=0.01) == pytest.approx(0.0, abs=1e-15)


def test_per_step_is_fractional_epochs() -> None:
    # 7 steps per epoch: step 3 of epoch 2 is t = 2 + 3/7 epochs, inside the 10-epoch warm-up.
    assert se_weight(2 + 3 / 7, 100, weight=0.01) == pytest.approx(0.01 * (2 + 3 / 7) / 10)


def test_short_run_shortens_warmup() -> None:
    # Run of 6 epochs: warm-up 3, peak at t = 3, zero at the end.
    assert se_weight(1.5, 6, weight=1.0) == pytest.approx(0.5)
    assert se_weight(3, 6, weight=1.0) == pytest.approx(1.0)
    assert se_weight(4.5, 6, weight=1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert se_weight(6, 6, weight=1.0) == pytest.approx(0.0, abs=1e-15)


def test_rises_then_falls() -> None:
    values = [se_weight(t / 4, 50, weight=1.0) for t in range(201)]
    peak = values.index(max(values))
    assert peak == 40
    assert all(a <= b for a, b in zip(values[:peak], values[1 : peak + 1], strict=True))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :], strict=False))


def test_clamps_outside_the_run() -> None:
    assert se_weight(-3, 50, weight=1.0) == 0.0
    assert se_weight(80, 50, weight=1.0) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t": 1, "total": 10, "weight": 1.0, "schedule": "step"}, "schedule"),
        ({"t": 1, "total": 0, "weight": 1.0}, "positive"),
        ({"t": 1, "total": 10, "weight": 1.0, "warmup": -1}, "warm-up"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        se_weight(**kwargs)
