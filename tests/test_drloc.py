"""Tests for DRLoc: offsets, the loss against an all-pairs oracle, the regulariser on timm ViTs."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from spatial_entropy.config import load_config
from spatial_entropy.drloc import (
    DRLocHead,
    drloc_loss,
    relative_offsets,
    sample_position_pairs,
)
from spatial_entropy.regularizers import (
    DRLocRegularizer,
    Regularizer,
    SpatialEntropyRegularizer,
)

# Reduced depth keeps each model fast; DRLoc only reads the final norm's output.
ARCHITECTURES = {
    "cls": ("vit_tiny_patch16_224", {"img_size": 64}, (64, 64), 1),
    "no_cls_avg": (
        "vit_tiny_patch16_224",
        {"img_size": 64, "class_token": False, "global_pool": "avg"},
        (64, 64),
        0,
    ),
    "registers": ("vit_tiny_patch16_224", {"img_size": 64, "reg_tokens": 4}, (64, 64), 5),
    "distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 64}, (64, 64), 2),
    "dynamic_64x48": (
        "vit_tiny_patch16_224",
        {"img_size": 64, "dynamic_img_size": True},
        (64, 48),
        1,
    ),
}


def make_model(key: str) -> tuple[nn.Module, torch.Tensor, int]:
    name, kwargs, (height, width), prefix = ARCHITECTURES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=5, **kwargs)
    return model, torch.randn(2, 3, height, width), prefix


def all_pairs_oracle(tokens: torch.Tensor, grid_shape: tuple[int, int], head: nn.Module):
    """Per-pair L1 errors over every ordered pair of positions, written out with loops."""
    gh, gw = grid_shape
    errors = []
    for b in range(tokens.shape[0]):
        for i in range(gh):
            for j in range(gw):
                for p in range(gh):
                    for q in range(gw):
                        pair = torch.cat([tokens[b, i * gw + j], tokens[b, p * gw + q]])
                        du, dv = head(pair).tolist()
                        errors.append(abs(du - (i - p) / gh) + abs(dv - (j - q) / gw))
    return torch.tensor(errors, dtype=torch.float64)


def all_positions(batch: int, num_patches: int) -> torch.Tensor:
    """(B, N*N, 2) every ordered pair of flat indices."""
    first, second = torch.meshgrid(
        torch.arange(num_patches), torch.arange(num_patches), indexing="ij"
    )
    pairs = torch.stack([first.flatten(), second.flatten()], dim=-1)
    return pairs.expand(batch, -1, -1).contiguous()


# --- functional pieces -------------------------------------------------------------------------


def test_relative_offsets_hand_computed() -> None:
    # Grid 2x3: index 5 is (1, 2), index 0 is (0, 0), index 4 is (1, 1).
    positions = torch.tensor([[5, 0], [0, 5], [4, 4], [1, 3]])
    expected = torch.tensor([[1 / 2, 2 / 3], [-1 / 2, -2 / 3], [0.0, 0.0], [-1 / 2, 1 / 3]])
    torch.testing.assert_close(relative_offsets(positions, (2, 3)), expected)


def test_sampled_positions_cover_the_grid_uniformly() -> None:
    generator = torch.Generator().manual_seed(0)
    positions = sample_position_pairs(4, (3, 5), 5000, generator)
    assert positions.shape == (4, 5000, 2) and positions.dtype == torch.int64
    counts = torch.bincount(positions.flatten(), minlength=15).double()
    # 40000 draws over 15 cells: each count ~ 2667 +- 50; 6 sigma bounds.
    assert counts.sub(40000 / 15).abs().max() < 6 * math.sqrt(40000 / 15)


def test_loss_over_all_pairs_matches_the_loop_oracle() -> None:
    torch.manual_seed(0)
    grid, tokens, head = (3, 4), torch.randn(2, 12, 6, dtype=torch.float64), DRLocHead(6, 16)
    head = head.double()
    with torch.no_grad():
        loss = drloc_loss(tokens, grid, head, all_positions(2, 12))
        expected = all_pairs_oracle(tokens, grid, head).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pairs", [4, 256])
def test_loss_is_independent_of_the_number_of_pairs_in_expectation(pairs: int) -> None:
    # The mean over pairs is unbiased for the all-pairs expectation whatever m is (the
    # reference's sum over pairs would grow like m). Oracle: the exact all-pairs mean; the
    # tolerance is 5 standard errors of the average of `draws * pairs * B` per-pair errors.
    torch.manual_seed(0)
    grid, tokens, head = (3, 4), torch.randn(2, 12, 6, dtype=torch.float64), DRLocHead(6, 16)
    head = head.double()
    with torch.no_grad():
        errors = all_pairs_oracle(tokens, grid, head)
        generator = torch.Generator().manual_seed(1)
        draws = 16384 // pairs
        estimate = torch.stack([
            drloc_loss(tokens, grid, head, sample_position_pairs(2, grid, pairs, generator))
            for _ in range(draws)
        ]).double().mean()  # fmt: skip
    standard_error = errors.std() / math.sqrt(draws * pairs * 2)
    assert abs(estimate - errors.mean()) < 5 * standard_error
    # The reference's sum would differ from the expectation by a factor m: far outside.
    assert 5 * standard_error < 0.5 * errors.mean()


def test_trained_head_recovers_known_offsets_from_a_positional_code() -> None:
    # Embeddings are a fixed code of the position (one-hot row and column), so a head that
    # learns DRLoc must recover the true offsets. Chance: the best constant prediction (0, 0)
    # errs by E|i - p| / gh + E|j - q| / gw over uniform pairs.
    gh, gw = 6, 5
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    code = torch.cat(
        [nn.functional.one_hot(rows.flatten(), gh), nn.functional.one_hot(cols.flatten(), gw)], 1
    )
    tokens = code.float()[None]
    # E|i - p| over uniform i, p in 0..s-1 is (s^2 - 1) / (3 s).
    chance = sum((s * s - 1) / (3 * s) / s for s in (gh, gw))  # 0.644
    torch.manual_seed(0)
    head = DRLocHead(gh + gw, hidden=64)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = drloc_loss(
            tokens, (gh, gw), head, sample_position_pairs(1, (gh, gw), 256, generator)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        exact = drloc_loss(tokens, (gh, gw), head, all_positions(1, gh * gw))
    assert exact < 0.1 * chance, (exact, chance)


# --- the regulariser on timm ViTs --------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_captures_the_final_patch_tokens_on_their_grid(key: str) -> None:
    model, images, prefix = make_model(key)
    drloc = DRLocRegularizer(0.5, pairs=8, hidden=16)
    drloc.attach(model)
    model(images)
    with torch.no_grad():
        expected = model.forward_features(images)[:, prefix:]
    gh, gw = images.shape[-2] // 16, images.shape[-1] // 16
    assert drloc.grid_shape == (gh, gw)
    torch.testing.assert_close(drloc.tokens.detach(), expected)
    # Value through the public pieces, with the same draw (seed 0): weight * drloc_loss.
    value = drloc()
    positions = sample_position_pairs(2, (gh, gw), 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(value, 0.5 * drloc_loss(expected, (gh, gw), drloc.module, positions))


def test_gradients_reach_the_backbone_and_the_head_only_through_drloc() -> None:
    model, images, _ = make_model("no_cls_avg")
    drloc = DRLocRegularizer(1.0, pairs=16, hidden=32)
    drloc.attach(model)
    model(images)
    drloc().backward()
    for name, param in [*model.blocks.named_parameters(), *model.patch_embed.named_parameters()]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in drloc.module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # The head is not part of the model: it never enters model.state_dict() or model.parameters().
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in drloc.module.parameters())
    assert not any(k.startswith("drloc") for k in model.state_dict())
    assert model.head.weight.grad is None


def test_works_beside_spatial_entropy() -> None:
    model, images, _ = make_model("cls")
    regularizers = [SpatialEntropyRegularizer(0.1, "constant"), DRLocRegularizer(0.1, 8, 16)]
    for reg in regularizers:
        assert isinstance(reg, Regularizer)
        reg.attach(model)
        reg.set_progress(1.0, 10.0)
    loss = model(images).logsumexp(-1).mean()
    total = loss + sum(reg() for reg in regularizers)
    total.backward()
    assert set(regularizers[0].stats()) == {"se", "se_weight"}
    assert set(regularizers[1].stats()) == {"drloc"}
    assert regularizers[0].module is None and regularizers[0].state_dict() == {}
    assert regularizers[1].module is not None


def test_no_grad_returns_zero_and_does_not_draw() -> None:
    model, images, _ = make_model("cls")
    a, b = DRLocRegularizer(0.1, 8, 16, seed=3), DRLocRegularizer(0.1, 8, 16, seed=3)
    for reg in (a, b):
        reg.attach(model)
    b.module.load_state_dict(a.module.state_dict())
    model(images)
    a_first = a()
    with torch.no_grad():
        model(images)
        assert a() == 0
    model(images)
    assert torch.equal(a(), (b(), b())[1])
    assert not torch.equal(a_first, a())


def test_seeded_draws_are_reproducible_and_the_state_restores_them() -> None:
    model, images, _ = make_model("no_cls_avg")
    a = DRLocRegularizer(0.1, pairs=8, hidden=16, seed=7)
    a.attach(model)
    b = DRLocRegularizer(0.1, pairs=8, hidden=16, seed=7)
    b.attach(model)
    b.module.load_state_dict(a.module.state_dict())
    model(images)
    assert all(torch.equal(a(), b()) for _ in range(3))  # same seed, same stream

    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    later = [a() for _ in range(3)]
    buffer.seek(0)
    c = DRLocRegularizer(0.1, pairs=8, hidden=16, seed=0)
    c.attach(model)
    c.module.load_state_dict(a.module.state_dict())
    c.load_state_dict(torch.load(buffer, weights_only=True))
    model(images)  # the hooks of a and c both see this forward
    assert c.seed == 7
    assert all(torch.equal(c(), value) for value in later)
    assert len({float(v.detach()) for v in later}) == 3  # the stream moves on between draws

    fresh, other = (DRLocRegularizer(0.1, pairs=8, hidden=16, seed=s) for s in (7, 8))
    for reg in (fresh, other):
        reg.attach(model)
        reg.module.load_state_dict(a.module.state_dict())
    model(images)
    assert not torch.equal(fresh(), other())


def test_state_dict_round_trips_before_the_first_draw() -> None:
    a = DRLocRegularizer(0.1, seed=5)
    b = DRLocRegularizer(0.1, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"seed": 5, "generator": None, "device_type": None}


def test_state_from_another_device_type_is_refused() -> None:
    model, images, _ = make_model("cls")
    drloc = DRLocRegularizer(0.1, 8, 16)
    drloc.attach(model)
    drloc.load_state_dict(
        {"seed": 0, "generator": torch.zeros(16, dtype=torch.uint8), "device_type": "cuda"}
    )
    model(images)
    with pytest.raises(ValueError, match="saved on cuda"):
        drloc()


def test_distributed_data_parallel_model_and_head(tmp_path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model, images, prefix = make_model("registers")
        ddp = nn.parallel.DistributedDataParallel(model)
        drloc = DRLocRegularizer(0.1, pairs=8, hidden=16)
        drloc.attach(ddp)
        drloc.module = nn.parallel.DistributedDataParallel(drloc.module)
        ddp(images)
        drloc().backward()
        with torch.no_grad():
            expected = model.forward_features(images)[:, prefix:]
        torch.testing.assert_close(drloc.tokens.detach(), expected)
        assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
        assert drloc.module.module.layers[0].weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draw_and_loss_need_no_host_sync() -> None:
    model, images, _ = make_model("no_cls_avg")
    model.cuda()
    drloc = DRLocRegularizer(0.1, pairs=64, hidden=32)
    drloc.attach(model)
    assert next(drloc.module.parameters()).is_cuda
    model(images.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = drloc()
        state = drloc.state_dict()
        second = drloc()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert state["device_type"] == "cuda"
    drloc.load_state_dict(state)
    assert torch.equal(drloc(), second) and not torch.equal(first, second)


def test_head_follows_the_model_dtype() -> None:
    model, images, _ = make_model("cls")
    model.double()
    drloc = DRLocRegularizer(0.1, 8, 16)
    drloc.attach(model)
    model(images.double())
    assert drloc().dtype == torch.float32
    assert next(drloc.module.parameters()).dtype == torch.float64


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": -0.1}, "weight"),
        ({"weight": 0.1, "pairs": 0}, "pairs"),
        ({"weight": 0.1, "hidden": 0}, "hidden"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DRLocRegularizer(**kwargs)


def test_unsupported_model_and_call_before_attach() -> None:
    drloc = DRLocRegularizer(0.1)
    with pytest.raises(RuntimeError, match="attach"):
        drloc()
    with pytest.raises(TypeError, match="VisionTransformer-style.*Linear"):
        drloc.attach(nn.Linear(3, 3))
    model, _, _ = make_model("cls")
    drloc.attach(model)
    with pytest.raises(RuntimeError, match="no forward pass"):
        drloc()


def test_patch_dropout_is_reported() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, patch_drop_rate=0.5)
    drloc = DRLocRegularizer(0.1, 8, 16)
    drloc.attach(model)
    with pytest.raises(RuntimeError, match="patch dropout"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda h: drloc_loss(
                torch.randn(2, 11, 4), (3, 4), h, torch.zeros(2, 3, 2, dtype=torch.long)
            ),
            r"\(B, 3\*4, D\)",
        ),
        (
            lambda h: drloc_loss(torch.randn(2, 12, 4), (3, 4), h, torch.zeros(2, 3, 2)),
            "int64 positions",
        ),
        (
            lambda h: drloc_loss(
                torch.randn(2, 12, 4), (3, 4), h, torch.zeros(1, 3, 2, dtype=torch.long)
            ),
            r"\(2, m, 2\)",
        ),
        (
            lambda h: drloc_loss(
                torch.randn(2, 12, 4), (3, 0), h, torch.zeros(2, 3, 2, dtype=torch.long)
            ),
            "grid_shape",
        ),
        (lambda h: sample_position_pairs(2, (3, 4), 0), "pairs >= 1"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        call(DRLocHead(4, 8))
    assert "\n" not in str(info.value)


def test_config_keys() -> None:
    config = load_config(overrides=["drloc.weight=0.1", "drloc.pairs=32", "drloc.hidden=128"])
    assert (config.drloc.weight, config.drloc.pairs, config.drloc.hidden) == (0.1, 32, 128)
    default = load_config()
    assert (default.drloc.weight, default.drloc.pairs, default.drloc.hidden) == (0.0, 64, 512)
    for item, match in [
        ("drloc.weight=-1", "'drloc.weight' must be >= 0"),
        ("drloc.pairs=0", "'drloc.pairs' must be >= 1"),
        ("drloc.hidden=0", "'drloc.hidden' must be >= 1"),
        ("drloc.pair=3", "did you mean 'drloc.pairs'"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(overrides=[item])
