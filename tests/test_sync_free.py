"""The tensor loss is GPU-ready: no host synchronisation, a data-independent op sequence, and
``torch.compile(fullgraph=True)`` without a graph break. Checked on CPU by watching the ATen ops
that the loss dispatches (the CUDA path is the same code with float16 matmuls)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from spatial_entropy import label_components, reference_spatial_entropy, spatial_entropy
from test_components import ADVERSARIAL, checkerboard, snake, spiral

# ATen ops that copy a value to the host (the CPU waits for the GPU) or whose output shape
# depends on the data (nonzero, boolean indexing, unique...): each stops a CUDA graph capture.
SYNCING = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.bincount",
    "aten.masked_scatter",
}


class OpLog(TorchDispatchMode):
    """Records every ATen op dispatched (forward and backward) and flags boolean indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.boolean_index = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(f"aten.{func.overloadpacket.__name__}")
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put):
            indices = args[1] if len(args) > 1 else ()
            self.boolean_index |= any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
            )
        if (
            func.overloadpacket == torch.ops.aten.repeat_interleave
            and func._overloadname != "self_int"
        ):
            # repeat_interleave with tensor repeats sizes its output from the data
            self.ops.append("aten.repeat_interleave.data_sized")
        return func(*args, **(kwargs or {}))


def logits_for(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One map whose foreground (logits above the mean) is ``mask``, with uneven weights."""
    generator = torch.Generator().manual_seed(seed)
    values = 1.0 + torch.rand(mask.shape, generator=generator)
    # background -2 keeps the mean below 1 while at most 3/4 of the grid is foreground
    return torch.where(mask, values, torch.full_like(values, -2.0)).reshape(1, 1, -1)


def loss_ops(logits: torch.Tensor, grid: tuple[int, int], **kwargs) -> OpLog:
    x = logits.detach().requires_grad_(True)
    with OpLog() as log:
        spatial_entropy(x, grid, **kwargs).sum().backward()
    return log


GRID = (14, 14)
MAPS = {
    "spiral": logits_for(spiral(14)),
    "snake": logits_for(snake(14, 14)),
    "checkerboard": logits_for(checkerboard(14, 14)),
    "random": torch.randn(1, 1, 196, generator=torch.Generator().manual_seed(1)),
    "empty (constant map)": torch.zeros(1, 1, 196),
    "one patch": torch.zeros(1, 1, 196).index_fill_(2, torch.tensor([100]), 1.0),
}


@pytest.mark.parametrize("backend", ["torch", "closure"])
def test_loss_dispatches_the_same_ops_for_every_map(backend: str) -> None:
    logs = {name: loss_ops(x.expand(3, 2, -1), GRID, backend=backend) for name, x in MAPS.items()}
    sequences = {name: log.ops for name, log in logs.items()}
    first = next(iter(sequences.values()))
    with OpLog() as forward_only:
        spatial_entropy(MAPS["random"], GRID, backend=backend)
    # the log holds the closure's matmuls and the backward's ops too
    assert "aten.bmm" in first and len(first) > len(forward_only.ops)
    for name, ops in sequences.items():
        assert ops == first, (
            f"{name}: {Counter(ops) - Counter(first)} {Counter(first) - Counter(ops)}"
        )


@pytest.mark.parametrize("backend", ["torch", "closure"])
@pytest.mark.parametrize("name", sorted(MAPS))
def test_loss_dispatches_no_synchronising_op(name: str, backend: str) -> None:
    log = loss_ops(MAPS[name].expand(2, 3, -1), GRID, backend=backend)
    assert not (set(log.ops) & SYNCING), set(log.ops) & SYNCING
    assert "aten.repeat_interleave.data_sized" not in log.ops
    assert not log.boolean_index


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_loss_backward_accumulates_by_scatter_not_by_index_put(backend: str) -> None:
    # Most patches share a few ids (the background and each region): the backward of advanced
    # indexing (index_put with accumulate) sorts the indices and serialises the duplicates on
    # CUDA, 6.6 of the loss's 8.6 ms of GPU time at 128x6 maps of 14x14 on an H200
    # (benchmarks/gpu_probe.py); a gather's backward is one scatter_add.
    log = loss_ops(MAPS["random"].expand(4, 3, -1), GRID, backend=backend)
    assert "aten.index_put" not in log.ops and "aten._index_put_impl_" not in log.ops
    assert "aten.scatter_add" in log.ops


def test_the_op_log_sees_boolean_indexing() -> None:
    # Guards the watcher itself.
    with OpLog() as log:
        torch.ones(3)[torch.tensor([True, False, True])]
    assert log.boolean_index


@pytest.mark.parametrize("grid", [(14, 14), (24, 24), (1, 9), (5, 13)])
def test_loss_runs_on_fake_tensors_that_hold_no_data(grid: tuple[int, int]) -> None:
    # Fake tensors have shapes but no values: any host read (.item(), .tolist(), a Python
    # ``if`` on a tensor) and any op whose output shape depends on the data (nonzero, boolean
    # indexing) raises. Forward and backward through them run: nothing waits for the data.
    with FakeTensorMode():
        logits = torch.randn(4, 3, grid[0] * grid[1], requires_grad=True)
        value = spatial_entropy(logits, grid, backend="torch")
        value.sum().backward()
    assert value.shape == (4, 3) and logits.grad.shape == logits.shape


def test_fake_tensors_catch_the_propagation_labellers_synchronisation() -> None:
    # Guards the previous test: the propagation labeller reads its convergence check on the host.
    with pytest.raises(DataDependentOutputException), FakeTensorMode():
        spatial_entropy(torch.randn(2, 2, 196), (14, 14), backend="propagate")


def test_label_components_closure_dispatches_the_same_ops_and_no_sync() -> None:
    sequences = []
    for mask in (spiral(24), ~spiral(24), torch.zeros(24, 24, dtype=torch.bool)):
        with OpLog() as log:
            label_components(mask.expand(2, -1, -1), backend="closure")
        assert not (set(log.ops) & SYNCING) and not log.boolean_index
        sequences.append(log.ops)
    assert sequences[0] == sequences[1] == sequences[2]


# ---------------------------------------------------------------- values on adversarial maps


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("backend", ["torch", "propagate", "scipy"])
@pytest.mark.parametrize(
    "name", ["snake_14", "snake_24x10", "spiral_24", "checkerboard", "diagonal", "row", "column"]
)
def test_adversarial_maps_match_reference_values_and_gradients(
    name: str, backend: str, connectivity: int
) -> None:
    mask = ADVERSARIAL[name]
    grid = tuple(mask.shape)
    # the mask, its complement (many regions) and two seeds of weights, as one batch
    logits = torch.cat(
        [logits_for(mask, 0), logits_for(~mask, 1), logits_for(mask, 2), logits_for(~mask, 3)], 1
    )
    foreground = logits > logits.mean(-1, keepdim=True)
    assert torch.equal(foreground[0, 0], mask.reshape(-1))  # guards the fixture
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    upstream = torch.rand(1, 4, generator=torch.Generator().manual_seed(5))
    ours = spatial_entropy(x, grid, connectivity=connectivity, backend=backend)
    expected = reference_spatial_entropy(y, grid, connectivity=connectivity)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    (ours * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("grid", [(14, 14), (5, 13), (1, 9)])
def test_compiles_fullgraph_and_matches_eager(grid: tuple[int, int]) -> None:
    # fullgraph=True raises on any graph break whatever the compiler backend; aot_eager traces
    # forward and backward through AOTAutograd without generating code, so CI stays fast.
    torch._dynamo.reset()
    compiled = torch.compile(spatial_entropy, fullgraph=True, backend="aot_eager")
    generator = torch.Generator().manual_seed(grid[0] * 31 + grid[1])
    logits = torch.randn(3, 2, grid[0] * grid[1], generator=generator)
    logits[0, 0] = logits_for(checkerboard(*grid)).reshape(-1)
    x = logits.clone().requires_grad_(True)
    y = logits.clone().requires_grad_(True)
    ours = compiled(x, grid, backend="torch")
    eager = spatial_entropy(y, grid, backend="torch")
    torch.testing.assert_close(ours, eager, atol=1e-6, rtol=1e-5)
    ours.sum().backward()
    eager.sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grid", [(14, 14), (24, 24)])
def test_cuda_loss_forward_backward_synchronises_never(grid: tuple[int, int]) -> None:
    import warnings

    logits = torch.randn(64, 6, grid[0] * grid[1], device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            spatial_entropy(logits, grid).mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert syncs == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_the_loss_forward_and_backward() -> None:
    static = torch.randn(32, 6, 196, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream before capture
        for _ in range(2):
            static.grad = None
            spatial_entropy(static, (14, 14)).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        value = spatial_entropy(static, (14, 14))
        value.sum().backward()
    fresh = torch.randn(32, 6, 196, device="cuda")
    fresh[0, 0] = logits_for(spiral(14)).reshape(-1).cuda()
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    x = fresh.cpu().requires_grad_(True)
    expected = reference_spatial_entropy(x, (14, 14))
    expected.sum().backward()
    torch.testing.assert_close(value.cpu(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(static.grad.cpu(), x.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_batches_equal_the_loader_and_synchronise_never() -> None:
    import warnings

    from spatial_entropy.data import build_dataset
    from spatial_entropy.distributed import DistributedInfo
    from spatial_entropy.loader import DeviceTrainBatches, build_train_loader

    augment = {"auto_augment": None, "reprob": 0.0}
    data = build_dataset("fashion-mnist", "train", is_train=True, augment=augment, n_per_class=8)
    on_gpu = DeviceTrainBatches(data, 16, DistributedInfo(device=torch.device("cuda")), seed=4)
    reference = list(build_train_loader(data, 16, DistributedInfo(), seed=4))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            batches = list(on_gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert syncs == []
    assert len(batches) == len(reference) == 5
    for (x, y), (u, v) in zip(batches, reference, strict=True):
        assert x.is_cuda and torch.equal(x.cpu(), u) and torch.equal(y.cpu(), v)
