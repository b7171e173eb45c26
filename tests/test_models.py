"""Tests for the model factory: presets, "no last skip", and checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from spatial_entropy import create_model, load_checkpoint_into
from spatial_entropy.checkpoint import save_checkpoint
from spatial_entropy.models import NoSkipAttentionBlock


def vit_parameter_count(
    *, img: int, patch: int, in_chans: int, dim: int, depth: int, classes: int
) -> int:
    """Parameters of a timm ViT (class token, learned pos embed, qkv bias, MLP ratio 4)."""
    tokens = (img // patch) ** 2 + 1
    patch_embed = in_chans * patch * patch * dim + dim
    layer_norm = 2 * dim
    block = (
        2 * layer_norm
        + (dim * 3 * dim + 3 * dim)  # qkv
        + (dim * dim + dim)  # proj
        + (dim * 4 * dim + 4 * dim)  # fc1
        + (4 * dim * dim + dim)  # fc2
    )
    head = dim * classes + classes
    return patch_embed + dim + tokens * dim + depth * block + layer_norm + head


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def assert_same_weights(model: nn.Module, state_dict: dict, skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    for key, value in state_dict.items():
        if not key.startswith(skip):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


# --- presets -------------------------------------------------------------------------------


def test_presets_are_registered_with_timm() -> None:
    assert {"se_vit_tiny_patch4_32", "se_vit_small_patch8_64"} <= set(timm.list_models("se_vit*"))
    tiny = timm.create_model("se_vit_tiny_patch4_32")
    small = timm.create_model("se_vit_small_patch8_64")
    assert tiny.patch_embed.grid_size == (8, 8) and small.patch_embed.grid_size == (8, 8)
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].attn.num_heads) == (192, 6, 3)
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (128, 6, 4)
    # The counts stated in the presets' docstrings.
    assert n_params(tiny) == 2_693_578
    assert n_params(small) == 1_224_330
    assert n_params(tiny) == vit_parameter_count(
        img=32, patch=4, in_chans=3, dim=192, depth=6, classes=10
    )
    assert n_params(small) == vit_parameter_count(
        img=64, patch=8, in_chans=3, dim=128, depth=6, classes=10
    )


def test_14x14_presets_match_the_benchmark_vit_within_ten_percent() -> None:
    """The second benchmark's arms: same width, depth, heads and 14x14 grid, parameter counts
    within 10 % of the ViT (grey input, 10 classes, as on cluttered-fashion)."""
    vit, convit, stem = (
        create_model(name, num_classes=10, in_chans=1)
        for name in (
            "se_vit_small_patch4_56",
            "se_convit_small_patch4_56",
            "se_vit_convstem_small_56",
        )
    )
    reference = vit_parameter_count(img=56, patch=4, in_chans=1, dim=128, depth=6, classes=10)
    assert n_params(vit) == reference
    # conv stem by hand: 3x3 1->32 (no bias) + BN, 3x3 32->64 (no bias) + BN, 1x1 64->128 + bias,
    # in place of the 4x4 patchify conv (1 * 16 * 128 + 128)
    stem_params = 9 * 32 + 2 * 32 + 9 * 32 * 64 + 2 * 64 + 64 * 128 + 128
    assert n_params(stem) == reference - (16 * 128 + 128) + stem_params
    for model in (vit, convit, stem):
        assert abs(n_params(model) / reference - 1) < 0.10
        assert model.patch_embed.grid_size == (14, 14)
        assert model.embed_dim == 128 and len(model.blocks) == 6
        assert model.cls_token is not None
        assert model(torch.randn(2, 1, 56, 56)).shape == (2, 10)
    kinds = [type(block.attn).__name__ for block in convit.blocks]
    assert kinds == ["GPSA"] * 4 + ["MHSA"] * 2
    assert all(block.attn.num_heads == 4 for block in (*vit.blocks, *convit.blocks, *stem.blocks))


def test_attention_capture_on_the_14x14_presets() -> None:
    from spatial_entropy.attention import AttentionCapture

    stem = create_model("se_vit_convstem_small_56", num_classes=10, in_chans=1).eval()
    with AttentionCapture(stem) as capture:
        stem(torch.randn(2, 1, 56, 56))
    assert capture.grid_shape == (14, 14) and capture.logits.shape == (2, 4, 196)
    # ConViT's last blocks are not timm Attention: no capture (the benchmark reports no Jaccard)
    convit = create_model("se_convit_small_patch4_56", num_classes=10, in_chans=1)
    with pytest.raises(TypeError, match="ConVit"):
        AttentionCapture(convit)


def test_create_model_arguments_reach_the_model() -> None:
    model = create_model(
        "se_vit_small_patch8_64",
        num_classes=7,
        img_size=(48, 32),
        in_chans=1,
        drop_path_rate=0.1,
        depth=3,
    )
    assert model.patch_embed.grid_size == (6, 4)
    assert model.patch_embed.proj.in_channels == 1
    assert model.head.out_features == 7
    assert len(model.blocks) == 3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 48, 32)).shape == (2, 7)
    assert n_params(create_model("se_vit_small_patch8_64", num_classes=10, in_chans=1)) == (
        vit_parameter_count(img=64, patch=8, in_chans=1, dim=128, depth=6, classes=10)
    )


def test_create_model_rejects_non_vits_and_bad_class_counts() -> None:
    with pytest.raises(TypeError, match="Vision Transformers"):
        create_model("resnet10t", num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("se_vit_tiny_patch4_32", num_classes=-1)


# --- no last skip ----------------------------------------------------------------------------


def test_no_last_skip_forward_matches_explicit_computation() -> None:
    torch.manual_seed(0)
    model = randomized(create_model("se_vit_tiny_patch4_32", num_classes=5, depth=2)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        standard = model(images)
        first = model.blocks[0]
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        tokens = first(tokens)
        last = model.blocks[-1]
        # The published variant: no attention residual, norm2 -> identity, MLP residual kept.
        y = last.attn(last.norm1(tokens))
        out = y + last.mlp(y)
        expected = model.head(model.norm(out)[:, 0])

    converted = create_model("se_vit_tiny_patch4_32", num_classes=5, depth=2, no_last_skip=True)
    load_checkpoint_into(converted, model.state_dict())
    converted.eval()
    assert isinstance(converted.blocks[-1], NoSkipAttentionBlock)
    assert isinstance(converted.blocks[-1].norm2, nn.Identity)
    assert not isinstance(converted.blocks[0], NoSkipAttentionBlock)
    with torch.no_grad():
        got = converted(images)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, standard, atol=1e-3)


def test_no_last_skip_keeps_the_attention_branch_under_drop_path() -> None:
    # With drop path on, only the MLP branch of the last block may be dropped: the
    # attention branch has no residual, so dropping it would zero the sample.
    torch.manual_seed(0)
    model = create_model(
        "se_vit_tiny_patch4_32", num_classes=5, depth=2, no_last_skip=True, drop_path_rate=0.9
    )
    block = model.blocks[-1]
    assert not hasattr(block, "drop_path1")
    keep_prob = 1 - block.drop_path2.drop_prob
    assert keep_prob == pytest.approx(0.1)
    tokens = torch.randn(64, 5, 192)
    with torch.no_grad():
        y = block.ls1(block.attn(block.norm1(tokens)))
        out = block(tokens)
    # Every sample's output is y (MLP branch dropped) or y + mlp(y) / keep_prob, never 0.
    dropped = torch.isclose(out, y, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, y + block.mlp(y) / keep_prob, atol=1e-4).flatten(1).all(1)
    assert (dropped | kept).all() and dropped.any() and kept.any()


def test_no_last_skip_needs_a_standard_block() -> None:
    with pytest.raises(TypeError, match="Block"):
        create_model(
            "vit_tiny_patch16_224",
            num_classes=2,
            depth=1,
            img_size=32,
            block_fn=ResPostBlock,
            no_last_skip=True,
        )


# --- checkpoints -----------------------------------------------------------------------------


def test_round_trip_through_safetensors_file_and_directory(tmp_path) -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2))
    state = source.state_dict()
    save_file(state, tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2, checkpoint=path)
        assert_same_weights(model, state)


def test_loads_the_latest_training_checkpoint_of_a_run(tmp_path) -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2))
    save_checkpoint(tmp_path / "run", 5, create_model("se_vit_tiny_patch4_32", num_classes=10), {})
    stem = save_checkpoint(tmp_path / "run", 10, source, {"epoch": 1})
    for path in (tmp_path / "run", stem):
        model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2, checkpoint=path)
        assert_same_weights(model, source.state_dict())


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_deit_style_pth_with_module_prefix(tmp_path, wrapper: str) -> None:
    source = randomized(create_model("deit_tiny_patch16_224", num_classes=10, depth=2))
    state = source.state_dict()
    # A DeiT training checkpoint: DDP-prefixed weights beside optimizer state and argparse args.
    payload = {
        wrapper: {f"module.{k}": v for k, v in state.items()},
        "epoch": 3,
        "args": argparse.Namespace(lr=5e-4),
    }
    torch.save(payload, tmp_path / "checkpoint.pth")
    model = create_model(
        "deit_tiny_patch16_224", num_classes=10, depth=2, checkpoint=tmp_path / "checkpoint.pth"
    )
    assert_same_weights(model, state)


def test_fine_tuning_resamples_pos_embed_and_replaces_the_head() -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2))
    state = source.state_dict()
    model = create_model("se_vit_tiny_patch4_32", num_classes=3, img_size=48, depth=2)
    fresh_head = model.head.weight.clone()
    load_checkpoint_into(model, state)

    assert_same_weights(model, state, skip=("pos_embed", "head."))
    assert model.head.weight.shape == (3, 192)
    torch.testing.assert_close(model.head.weight, fresh_head)  # new head, not the old one
    # Class-token entry kept; the 8x8 patch grid resampled to 12x12.
    assert model.pos_embed.shape == (1, 1 + 144, 192)
    torch.testing.assert_close(model.pos_embed[:, :1], state["pos_embed"][:, :1])
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(12, 12), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected)


def test_strict_loading_adapts_nothing() -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1))
    own = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1)
    load_checkpoint_into(own, source.state_dict(), strict=True)
    assert_same_weights(own, source.state_dict())
    for other in (
        create_model("se_vit_tiny_patch4_32", num_classes=3, depth=1),
        create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1, img_size=48),
        create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1, in_chans=1),
    ):
        with pytest.raises(ValueError, match="size mismatches"):
            load_checkpoint_into(other, source.state_dict(), strict=True)


def test_distilled_heads_are_both_replaced() -> None:
    source = randomized(create_model("deit_tiny_distilled_patch16_224", num_classes=10, depth=1))
    model = create_model("deit_tiny_distilled_patch16_224", num_classes=4, depth=1)
    load_checkpoint_into(model, source.state_dict())
    assert model.head.out_features == 4 and model.head_dist.out_features == 4
    assert_same_weights(model, source.state_dict(), skip=("head.", "head_dist."))


def test_single_channel_model_from_rgb_checkpoint() -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1))
    model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1, in_chans=1)
    load_checkpoint_into(model, source.state_dict())
    # One grey channel = the sum of the RGB filters when R = G = B.
    expected = source.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(model.patch_embed.proj.weight, expected)
    grey = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(grey), source.eval()(grey.expand(-1, 3, -1, -1)))


def test_standard_checkpoint_into_no_last_skip_model() -> None:
    source = randomized(create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2))
    model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2, no_last_skip=True)
    load_checkpoint_into(model, source.state_dict())
    assert_same_weights(model, source.state_dict(), skip=("blocks.1.norm2.",))


def test_mismatched_checkpoint_error_lists_keys_and_leaves_model_untouched() -> None:
    source = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=2).state_dict()
    source["extra.weight"] = torch.zeros(1)
    model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_checkpoint_into(model, source)
    message = str(error.value)
    assert "missing keys" in message and "blocks.2.attn.qkv.weight" in message
    assert "unexpected keys ['extra.weight']" in message
    assert_same_weights(model, before)


def test_size_mismatch_is_reported() -> None:
    source = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1, mlp_ratio=2.0)
    model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: checkpoint \(384, 192\)"):
        load_checkpoint_into(model, source.state_dict())


def test_missing_file_raises(tmp_path) -> None:
    model = create_model("se_vit_tiny_patch4_32", num_classes=10, depth=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint_into(model, tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint_into(model, tmp_path)
