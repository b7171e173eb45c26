"""The spatial-entropy loss: hand-computed values, the per-map reference, gradients, numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spatial_entropy import (
    SpatialEntropyLoss,
    reference_spatial_entropy,
    spatial_entropy,
)
from spatial_entropy.entropy import foreground_weights


def blobs_map(
    grid: tuple[int, int], blobs: list[tuple[list[tuple[int, int]], float]]
) -> torch.Tensor:
    """A (1, 1, N) logit map: 0 everywhere, ``value`` on each blob's pixels."""
    logits = torch.zeros(grid)
    for pixels, value in blobs:
        for r, c in pixels:
            logits[r, c] = value
    return logits.reshape(1, 1, -1)


def smooth_maps(batch: int, heads: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random logits smoothed by a 3x3 box filter, so maps have blobs like real attention."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch * heads, 1, *grid, generator=generator)
    smooth = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return smooth.reshape(batch, heads, -1)


# ---------------------------------------------------------------- hand-computed values


def test_one_blob_is_zero() -> None:
    logits = blobs_map((5, 5), [([(1, 1), (1, 2), (2, 1), (2, 2)], 3.0)])
    assert spatial_entropy(logits, (5, 5)).item() == pytest.approx(0.0, abs=1e-7)


def test_two_equal_blobs_is_log2() -> None:
    logits = blobs_map((6, 6), [([(0, 0), (0, 1)], 2.0), ([(4, 4), (5, 4)], 2.0)])
    assert spatial_entropy(logits, (6, 6)).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 9])
def test_k_equal_blobs_is_log_k(k: int) -> None:
    # Single pixels on every other row and column never touch, even diagonally.
    positions = [(2 * (i // 3), 2 * (i % 3)) for i in range(k)]
    logits = blobs_map((6, 6), [([p], 1.0) for p in positions])
    assert spatial_entropy(logits, (6, 6)).item() == pytest.approx(math.log(k), rel=1e-6)


def test_unequal_blobs_by_hand() -> None:
    # Pixel values a and b on a 4x4 grid of zeros: mean m = (a + b) / 16, masses a - m and b - m.
    a, b = 5.0, 1.0
    m = (a + b) / 16
    p = (a - m) / (a + b - 2 * m)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    logits = blobs_map((4, 4), [([(0, 0)], a), ([(3, 3)], b)])
    assert spatial_entropy(logits, (4, 4)).item() == pytest.approx(expected, rel=1e-6)


def test_diagonal_neighbours_form_one_region_with_8_connectivity() -> None:
    logits = blobs_map((3, 3), [([(0, 0)], 1.0), ([(1, 1)], 1.0)])
    assert spatial_entropy(logits, (3, 3)).item() == pytest.approx(0.0, abs=1e-7)
    four = spatial_entropy(logits, (3, 3), connectivity=4).item()
    assert four == pytest.approx(math.log(2), rel=1e-6)


def test_constant_map_is_zero_with_finite_gradient() -> None:
    logits = torch.full((2, 3, 16), 0.7, requires_grad=True)
    value = spatial_entropy(logits, (4, 4))
    assert torch.equal(value, torch.zeros(2, 3))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.isfinite(grad).all()


def test_one_foreground_patch_is_zero_with_finite_gradient() -> None:
    logits = torch.zeros(1, 2, 12)
    logits[:, :, 5] = 4.0
    logits.requires_grad_(True)
    value = spatial_entropy(logits, (3, 4))
    assert value.abs().max().item() < 1e-7
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.isfinite(grad).all()


def test_docstring_example() -> None:
    logits = torch.zeros(1, 1, 9)
    logits[0, 0, [0, 8]] = 1.0
    assert spatial_entropy(logits, (3, 3)).item() == pytest.approx(math.log(2), rel=1e-6)


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    ("batch", "heads", "grid"),
    [(4, 3, (8, 8)), (3, 2, (14, 10)), (2, 2, (5, 13)), (3, 1, (1, 17)), (2, 2, (11, 1))],
)
@pytest.mark.parametrize("backend", ["scipy", "torch", "closure", "propagate"])
def test_matches_reference_on_smooth_maps(batch, heads, grid, backend) -> None:
    logits = smooth_maps(batch, heads, grid, seed=batch * 7 + heads)
    ours = spatial_entropy(logits, grid, backend=backend)
    expected = reference_spatial_entropy(logits, grid)
    assert ours.shape == (batch, heads) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    gh=st.integers(1, 9),
    gw=st.integers(1, 9),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    connectivity=st.sampled_from([4, 8]),
    backend=st.sampled_from(["scipy", "torch", "propagate"]),
)
def test_matches_reference_on_random_maps(gh, gw, heads, seed, connectivity, backend) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, heads, gh * gw, generator=generator)
    ours = spatial_entropy(logits, (gh, gw), connectivity=connectivity, backend=backend)
    expected = reference_spatial_entropy(logits, (gh, gw), connectivity=connectivity)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def test_gradients_match_reference() -> None:
    logits = smooth_maps(3, 4, (7, 9), seed=3).requires_grad_(True)
    upstream = torch.rand(3, 4)
    (ours,) = torch.autograd.grad((spatial_entropy(logits, (7, 9)) * upstream).sum(), logits)
    (expected,) = torch.autograd.grad(
        (reference_spatial_entropy(logits, (7, 9)) * upstream).sum(), logits
    )
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_gradcheck_float64(grid, backend) -> None:
    # Continuous random values have no ties with the mean, so the loss is smooth around them.
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 2, grid[0] * grid[1], generator=generator, dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: spatial_entropy(x, grid, backend=backend), (logits,))


def test_batch_equals_loop() -> None:
    logits = smooth_maps(5, 3, (6, 6), seed=5)
    batched = spatial_entropy(logits, (6, 6))
    for b in range(5):
        torch.testing.assert_close(batched[b : b + 1], spatial_entropy(logits[b : b + 1], (6, 6)))


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_invariant_to_positive_affine_maps(scale: float, shift: float, seed: int) -> None:
    # The foreground, the regions and the mass shares depend only on S - mean(S) up to scale.
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 2, 36, generator=generator, dtype=torch.float64)
    base = spatial_entropy(logits, (6, 6))
    moved = spatial_entropy(logits * scale + shift, (6, 6))
    torch.testing.assert_close(base, moved, atol=1e-7, rtol=1e-6)


# ---------------------------------------------------------------- numerics and dtypes


@pytest.mark.parametrize("magnitude", [1e-8, 1e4])
def test_extreme_magnitudes_are_finite_and_correct(magnitude: float) -> None:
    logits = (smooth_maps(3, 2, (8, 8), seed=1) * magnitude).requires_grad_(True)
    value = spatial_entropy(logits, (8, 8))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    expected = spatial_entropy(smooth_maps(3, 2, (8, 8), seed=1).double(), (8, 8)).float()
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_logits_near_the_float32_maximum(backend: str) -> None:
    # A float32 sum of 64 logits near 3e38 overflows; the mean itself is representable. The
    # oracle is the reference in float64, where nothing overflows.
    logits = 3.0e38 + 1.0e37 * smooth_maps(3, 2, (8, 8), seed=12)
    assert torch.isfinite(logits).all()
    value = spatial_entropy(logits, (8, 8), backend=backend)
    expected = reference_spatial_entropy(logits.double(), (8, 8)).float()
    assert torch.isfinite(value).all() and (expected > 0).any()
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(reference_spatial_entropy(logits, (8, 8)), expected)


def test_ordinary_maps_keep_the_float32_mean_bit_for_bit() -> None:
    # Only maps whose float32 sum overflows take the float64 mean: every other map's weights
    # and gradients are those of the plain float32 mean, so training runs of earlier versions
    # reproduce exactly (the demo's top-1 included).
    logits = smooth_maps(4, 3, (8, 8), seed=5)
    logits[0, 0] = 3.0e38 + 1.0e37 * logits[0, 0]  # overflows: takes the float64 mean
    x = logits.clone().requires_grad_(True)
    foreground, weights = foreground_weights(x)
    expected = torch.relu(logits - logits.mean(dim=-1, keepdim=True))
    assert torch.equal(weights[1:], expected[1:]) and torch.equal(weights[0, 1:], expected[0, 1:])
    assert torch.isfinite(weights[0, 0]).all() and foreground[0, 0].any()
    weights[1:].sum().backward()
    y = logits[1:].clone().requires_grad_(True)
    torch.relu(y - y.mean(dim=-1, keepdim=True)).sum().backward()
    assert torch.equal(x.grad[1:], y.grad)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_computed_in_float32(dtype: torch.dtype, backend: str) -> None:
    logits = smooth_maps(4, 3, (8, 8), seed=2).to(dtype).requires_grad_(True)
    value = spatial_entropy(logits, (8, 8), backend=backend)
    assert value.dtype == torch.float32
    # Same value as float32 arithmetic on the very same (rounded) inputs.
    torch.testing.assert_close(value, reference_spatial_entropy(logits.float(), (8, 8)))
    (grad,) = torch.autograd.grad(value.sum(), logits)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_float32_under_autocast(backend: str) -> None:
    logits = smooth_maps(2, 2, (6, 6), seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = spatial_entropy(logits, (6, 6), backend=backend)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference_spatial_entropy(logits, (6, 6)))


@pytest.mark.parametrize("backend", ["scipy", "torch"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_give_nan_for_their_map_only(bad: float, backend: str) -> None:
    logits = smooth_maps(2, 2, (5, 5), seed=6)
    clean = spatial_entropy(logits, (5, 5), backend=backend)
    logits[0, 1, 7] = bad
    value = spatial_entropy(logits, (5, 5), backend=backend)
    assert math.isnan(value[0, 1].item())
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[0, 1] = False
    torch.testing.assert_close(value[mask], clean[mask])
    assert math.isnan(reference_spatial_entropy(logits, (5, 5))[0, 1].item())


# ---------------------------------------------------------------- module and errors


def test_module_reduces_to_mean() -> None:
    logits = smooth_maps(3, 2, (4, 6), seed=8)
    loss = SpatialEntropyLoss()(logits, (4, 6))
    assert loss.shape == ()
    torch.testing.assert_close(loss, reference_spatial_entropy(logits, (4, 6)).mean())


@pytest.mark.parametrize(
    ("logits", "grid", "error", "message"),
    [
        (torch.zeros(2, 16), (4, 4), ValueError, "rank 3"),
        (torch.zeros(1, 2, 3, 16), (4, 4), ValueError, "rank 3"),
        (torch.zeros(2, 3, 15), (4, 4), ValueError, "N = gh \\* gw"),
        (torch.zeros(2, 3, 16, dtype=torch.int64), (4, 4), TypeError, "floating-point"),
        (torch.zeros(2, 3, 16, dtype=torch.bool), (4, 4), TypeError, "floating-point"),
        (torch.zeros(0, 3, 16), (4, 4), ValueError, "non-empty"),
        (torch.zeros(2, 3, 16), (16,), ValueError, "grid_shape"),
        (torch.zeros(2, 3, 16), (4, 0), ValueError, "grid_shape"),
        ([[0.0] * 16], (4, 4), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(logits, grid, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        spatial_entropy(logits, grid)
    with pytest.raises(error, match=message):
        reference_spatial_entropy(logits, grid)


@pytest.mark.parametrize("connectivity", [5, 6, 0, True, "8"])
def test_connectivity_other_than_4_or_8_is_rejected_everywhere(connectivity) -> None:
    # 5 used to be accepted: the scipy labeller read it as 8, the tensor labeller as 4.
    logits = torch.randn(1, 1, 16)
    for backend in ("scipy", "torch", "propagate"):
        with pytest.raises(ValueError, match="connectivity 4 or 8"):
            spatial_entropy(logits, (4, 4), connectivity=connectivity, backend=backend)
    with pytest.raises(ValueError, match="connectivity 4 or 8"):
        reference_spatial_entropy(logits, (4, 4), connectivity=connectivity)
    with pytest.raises(ValueError, match="connectivity 4 or 8"):
        SpatialEntropyLoss(connectivity=connectivity)


def test_unknown_backend_is_rejected_by_the_module_at_construction() -> None:
    with pytest.raises(ValueError, match="backend"):
        SpatialEntropyLoss(backend="opencv")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    logits = smooth_maps(8, 6, (14, 14), seed=9)
    for backend in ("torch", "propagate"):
        torch.testing.assert_close(
            spatial_entropy(logits.cuda(), (14, 14), backend=backend).cpu(),
            reference_spatial_entropy(logits, (14, 14)),
        )
