"""Connected-component labelling: exact against scipy's per-map labelling on every kind of mask."""

from __future__ import annotations

import warnings

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spatial_entropy import label_components, reference_label_components

# "torch" resolves to "closure" on these small grids; "propagate" is the large-grid labeller.
BACKENDS = ["scipy", "torch", "closure", "propagate"]


def scipy_labels(grid: np.ndarray, connectivity: int) -> np.ndarray:
    structure = scipy.ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return scipy.ndimage.label(grid, structure=structure)[0]


def assert_same_partition(labels: torch.Tensor, mask: torch.Tensor, connectivity: int) -> None:
    """Every map's labels are a relabelling of scipy's, and numbered like scipy's (raster order)."""
    maps = mask.reshape(-1, *mask.shape[-2:]).numpy()
    got = labels.reshape(-1, *mask.shape[-2:]).numpy()
    for grid, ours in zip(maps, got, strict=True):
        expected = scipy_labels(grid, connectivity)
        pairs = set(zip(expected[grid].tolist(), ours[grid].tolist(), strict=True))
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})
        assert (ours[~grid] == 0).all()
        np.testing.assert_array_equal(ours, expected)


def snake(h: int, w: int) -> torch.Tensor:
    """A boustrophedon path: full rows joined at alternating ends; one component, long path."""
    grid = torch.zeros(h, w, dtype=torch.bool)
    grid[::2] = True
    for row in range(1, h, 2):
        grid[row, w - 1 if (row // 2) % 2 == 0 else 0] = True
    return grid


def spiral(n: int) -> torch.Tensor:
    """A square spiral of 1-pixel-wide walls separated by 1-pixel gaps."""
    grid = torch.zeros(n, n, dtype=torch.bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        grid[top, left : right + 1] = True
        grid[top : bottom + 1, right] = True
        if bottom > top:
            grid[bottom, left : right + 1] = True
        if left + 2 <= right:
            grid[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            grid[top - 1, left] = True  # connects this ring to the next one inwards
    return grid


def diagonal_chain(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool).flip(1)


def checkerboard(h: int, w: int) -> torch.Tensor:
    return (torch.arange(h).view(-1, 1) + torch.arange(w)) % 2 == 0


ADVERSARIAL = {
    "snake_14": snake(14, 14),
    "snake_24x10": snake(24, 10),
    "spiral_15": spiral(15),
    "spiral_24": spiral(24),
    "diagonal": diagonal_chain(9),
    "checkerboard": checkerboard(8, 11),
    "full": torch.ones(7, 5, dtype=torch.bool),
    "empty": torch.zeros(6, 6, dtype=torch.bool),
    "row": torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1]], dtype=torch.bool),
    "column": torch.tensor([[1], [0], [1], [1], [0], [1]], dtype=torch.bool),
    "single": torch.ones(1, 1, dtype=torch.bool),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_masks(name: str, connectivity: int, backend: str) -> None:
    mask = ADVERSARIAL[name]
    assert_same_partition(label_components(mask, connectivity, backend=backend), mask, connectivity)


def test_hand_counted_components() -> None:
    # Counted by hand: the snake and spiral are one path; the diagonal is one 8-component but
    # n 4-components; a checkerboard is one 8-component and one 4-component per set square.
    assert label_components(snake(14, 14)).max() == 1
    assert label_components(spiral(15)).max() == 1
    assert label_components(diagonal_chain(9)).max() == 1
    assert label_components(diagonal_chain(9), connectivity=4).max() == 9
    assert label_components(checkerboard(8, 11)).max() == 1
    assert label_components(checkerboard(8, 11), connectivity=4).max() == 44


def test_spiral_is_a_single_long_path() -> None:
    # Guards the fixture itself: if the spiral fell apart, the adversarial test would be weak.
    grid = spiral(24)
    assert scipy_labels(grid.numpy(), 4).max() == 1
    assert grid.sum() > 24 * 24 // 2 - 24


masks = hnp.arrays(
    dtype=np.bool_,
    shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=13),
)


@settings(max_examples=150, deadline=None)
@given(mask=masks, connectivity=st.sampled_from([4, 8]), backend=st.sampled_from(BACKENDS))
def test_random_masks_match_scipy(mask: np.ndarray, connectivity: int, backend: str) -> None:
    tensor = torch.from_numpy(mask.copy())
    labels = label_components(tensor, connectivity, backend=backend)
    assert labels.dtype == torch.int64 and labels.shape == tensor.shape
    assert_same_partition(labels, tensor, connectivity)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 16),
    w=st.integers(1, 16),
    density=st.floats(0.3, 0.8),
    seed=st.integers(0, 2**31 - 1),
    backend=st.sampled_from(BACKENDS),
)
def test_batches_of_maps_are_labelled_independently(
    h: int, w: int, density: float, seed: int, backend: str
) -> None:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 3, h, w, generator=generator) < density
    batched = label_components(mask, backend=backend)
    for index in np.ndindex(5, 3):
        assert torch.equal(batched[index], label_components(mask[index], backend=backend))


def test_reference_matches_scipy_per_map() -> None:
    mask = torch.rand(4, 6, 9) > 0.5
    expected = np.stack([scipy_labels(m, 8) for m in mask.numpy()])
    np.testing.assert_array_equal(reference_label_components(mask).numpy(), expected)


def test_docstring_example() -> None:
    mask = torch.eye(3, dtype=torch.bool)
    assert label_components(mask).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert label_components(mask, connectivity=4).tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_empty_batch_and_zero_size() -> None:
    assert label_components(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4, 4)
    assert label_components(torch.zeros(3, 0, 4, dtype=torch.bool)).shape == (3, 0, 4)


@pytest.mark.parametrize(
    ("mask", "connectivity", "error", "message"),
    [
        (torch.zeros(4, 4), 8, TypeError, "boolean"),
        (torch.zeros(4, dtype=torch.bool), 8, ValueError, "rank"),
        (torch.zeros(4, 4, dtype=torch.bool), 6, ValueError, "connectivity"),
        (torch.zeros(4, 4, dtype=torch.bool), 5, ValueError, "connectivity"),
        (torch.zeros(4, 4, dtype=torch.bool), True, ValueError, "connectivity"),
        (np.zeros((4, 4), dtype=bool), 8, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(mask, connectivity: int, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        label_components(mask, connectivity)


def test_bad_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        label_components(torch.ones(2, 2, dtype=torch.bool), backend="opencv")


def test_closure_is_the_torch_backend_up_to_576_patches(monkeypatch) -> None:
    # The threshold that decides whether the CUDA loss synchronises: 24x24 closure, 24x25 not.
    import spatial_entropy.components as components

    used = []
    for name in ("_label_closure", "_label_propagate"):
        original = getattr(components, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            used.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(components, name, spy)
    label_components(spiral(24), backend="torch")
    label_components(snake(24, 25), backend="torch")
    assert used == ["_label_closure", "_label_propagate"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["spiral_24", "snake_24x10", "checkerboard"])
def test_half_precision_closure_is_exact(name: str, dtype: torch.dtype) -> None:
    # The CUDA closure multiplies in float16; run that arithmetic here on the longest paths.
    from spatial_entropy.components import _label_closure

    mask = ADVERSARIAL[name]
    maps = torch.stack([mask, ~mask])
    roots = _label_closure(maps, 8, dtype=dtype)
    assert torch.equal(roots, _label_closure(maps, 8, dtype=torch.float64))
    labels = label_components(maps, backend="closure")
    assert_same_partition(labels, maps, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("mask", "backend", "max_syncs"),
    [
        (snake(24, 24), "torch", 0),
        (spiral(24), "torch", 0),
        (checkerboard(14, 14), "torch", 0),
        (snake(24, 24), "propagate", 1),
        (spiral(24), "propagate", 1),
    ],
)
def test_cuda_synchronisations_and_exact(mask: torch.Tensor, backend: str, max_syncs: int) -> None:
    batch = torch.stack([mask, ~mask, torch.rand(mask.shape) > 0.5]).cuda()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            labels = label_components(batch, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first switch to "warn" also warns that the mode is a prototype: not a synchronisation
    syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
    assert len(syncs) <= max_syncs, [str(w.message) for w in syncs]
    assert labels.device.type == "cuda"
    assert_same_partition(labels.cpu(), batch.cpu(), 8)


@pytest.mark.parametrize("initial_rounds", [0, 1, 3])
@pytest.mark.parametrize("name", ["snake_24x10", "spiral_24", "checkerboard"])
def test_unsettled_maps_finish_after_the_check(name: str, initial_rounds: int) -> None:
    # Real maps settle within the first H + W rounds; forcing the check early exercises the
    # bounded second phase that guarantees exactness for any path length.
    from spatial_entropy.components import _label_propagate

    mask = ADVERSARIAL[name]
    maps = torch.stack([mask, ~mask])
    roots = _label_propagate(maps, 8, initial_rounds=initial_rounds)
    # A root is the flat index of the component's first pixel, so equal roots <=> same component.
    expected = torch.stack([torch.from_numpy(scipy_labels(m.numpy(), 8)) for m in maps])
    for grid, ours, theirs in zip(maps, roots, expected, strict=True):
        pairs = set(zip(theirs[grid].tolist(), ours[grid].tolist(), strict=True))
        assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 9), (9, 1), (2, 2), (3, 3), (7, 4), (14, 14), (14, 10), (5, 13), (24, 24)]
)
def test_run_closure_equals_the_pixel_closure(shape: tuple[int, int], connectivity: int) -> None:
    # The closure over row runs (what "closure" runs) against the closure over pixels, in
    # float64, on random masks of every density; roots are the same flat indices.
    from spatial_entropy.components import _label_closure, _label_closure_pixels

    generator = torch.Generator().manual_seed(sum(shape) + connectivity)
    maps = torch.cat([torch.rand(8, *shape, generator=generator) < p for p in (0.2, 0.5, 0.8)])
    for dtype in (torch.float32, torch.float16):
        expected = _label_closure_pixels(maps, connectivity, dtype=torch.float64)
        assert torch.equal(_label_closure(maps, connectivity, dtype=dtype), expected)
    adversarial = torch.stack([ADVERSARIAL[name] for name in ("spiral_24",)])
    assert torch.equal(_label_closure(adversarial, connectivity),
                       _label_closure_pixels(adversarial, connectivity))  # fmt: skip
