"""Tests for AttentionCapture: captured [CLS] logits against an explicit computation."""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from spatial_entropy import spatial_entropy
from spatial_entropy.attention import AttentionCapture

# Reduced depth (2) keeps each architecture fast; the capture only touches the last block.
ARCHITECTURES = {
    "vit_tiny": ("vit_tiny_patch16_224", {}, (224, 224)),
    "deit_tiny": ("deit_tiny_patch16_224", {}, (224, 224)),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}, (224, 224)),
    "vit_registers": ("vit_tiny_patch16_224", {"reg_tokens": 4}, (224, 224)),
    "vit_qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}, (224, 224)),
    "vit_dynamic_224x160": ("vit_tiny_patch16_224", {"dynamic_img_size": True}, (224, 160)),
    "se_vit_tiny_patch4_32": ("se_vit_tiny_patch4_32", {}, (32, 32)),
    "se_vit_small_patch8_64": ("se_vit_small_patch8_64", {}, (64, 64)),
}
# Prefix tokens (cls, dist, registers) and the patch grid each architecture must report.
EXPECTED = {
    "vit_tiny": (1, (14, 14)),
    "deit_tiny": (1, (14, 14)),
    "deit_tiny_distilled": (2, (14, 14)),
    "vit_registers": (5, (14, 14)),
    "vit_qk_norm": (1, (14, 14)),
    "vit_dynamic_224x160": (1, (14, 10)),
    "se_vit_tiny_patch4_32": (1, (8, 8)),
    "se_vit_small_patch8_64": (1, (8, 8)),
}


def make_model(key: str) -> tuple[nn.Module, torch.Tensor]:
    name, kwargs, (height, width) = ARCHITECTURES[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=5, **kwargs)
    # timm initialises the class/register tokens, biases and norm affines to near-constant
    # values; random ones make the comparison sensitive to every term.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model, torch.randn(2, 3, height, width)


def explicit_cls_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, N_all) [CLS] logits written out from the last block's weights."""
    tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    block = model.blocks[-1]
    attn = block.attn
    x = block.norm1(tokens)
    batch, n_tokens, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    shape = (batch, n_tokens, heads, head_dim)
    q = (x @ weight[:dim].T + bias[:dim]).reshape(shape)
    k = (x @ weight[dim : 2 * dim].T + bias[dim : 2 * dim]).reshape(shape)
    if isinstance(attn.q_norm, nn.LayerNorm):
        q = F.layer_norm(q, (head_dim,), attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
        k = F.layer_norm(k, (head_dim,), attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    # logits[b, h, j] = q[b, 0, h] . k[b, j, h] / sqrt(head_dim)
    return torch.einsum("bhd,bjhd->bhj", q[:, 0], k) / head_dim**0.5


def unfused_attention_matrix(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, heads, N_all, N_all) softmax attention of the last block, timm's unfused path."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    try:
        model(images)
    finally:
        handle.remove()
        attn.fused_attn = True
    return seen[0]


@pytest.mark.parametrize("key", list(ARCHITECTURES))
def test_logits_match_explicit_computation(key: str) -> None:
    model, images = make_model(key)
    model.eval()
    assert model.blocks[-1].attn.fused_attn  # the capture must work with fused attention on
    with AttentionCapture(model) as capture:
        model(images)
    prefix, grid = EXPECTED[key]
    heads = model.blocks[-1].attn.num_heads
    assert capture.num_prefix_tokens == prefix
    assert capture.grid_shape == grid
    assert capture.logits.shape == (2, heads, grid[0] * grid[1])
    assert capture.logits.dtype == torch.float32
    with torch.no_grad():
        expected = explicit_cls_logits(model, images)[..., prefix:]
    torch.testing.assert_close(capture.logits.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["deit_tiny_distilled", "vit_registers", "vit_dynamic_224x160"])
def test_attention_is_softmax_over_all_keys(key: str) -> None:
    model, images = make_model(key)
    model.eval()
    with AttentionCapture(model) as capture, torch.no_grad():
        model(images)
    prefix, _ = EXPECTED[key]
    full = unfused_attention_matrix(model, images)
    torch.testing.assert_close(capture.attention, full[:, :, 0, prefix:], atol=1e-6, rtol=1e-5)
    # Prefix keys take some of the mass, so the patch entries sum to less than one.
    assert (capture.attention.sum(-1) < 1).all()


@pytest.mark.parametrize("key", list(ARCHITECTURES)[:6])
def test_loss_backpropagates_into_last_block_q_and_k(key: str) -> None:
    model, images = make_model(key)
    with AttentionCapture(model) as capture:
        model(images)
        loss = spatial_entropy(capture.logits, capture.grid_shape).mean()
    assert loss.item() > 0  # random maps have several regions
    loss.backward()
    grad = model.blocks[-1].attn.qkv.weight.grad
    dim = grad.shape[1]
    assert grad[:dim].abs().sum() > 0  # q
    assert grad[dim : 2 * dim].abs().sum() > 0  # k
    # The last block's values do not enter its [CLS] logits.
    assert torch.equal(grad[2 * dim :], torch.zeros_like(grad[2 * dim :]))


def test_logits_are_float32_under_autocast() -> None:
    model, images = make_model("se_vit_small_patch8_64")
    model.eval()
    with AttentionCapture(model) as capture:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(images)
        assert capture.logits.dtype == torch.float32
        bf16_logits = capture.logits.detach()
        with torch.no_grad():
            model(images)
    torch.testing.assert_close(bf16_logits, capture.logits, atol=0.1, rtol=0.05)


def test_follows_the_model_across_dtype_and_device_moves() -> None:
    model, images = make_model("se_vit_tiny_patch4_32")
    model.eval()
    capture = AttentionCapture(model)
    model.to(torch.float64)
    with torch.no_grad():
        model(images.double())
        expected = explicit_cls_logits(model, images.double())[..., 1:]
    assert capture.logits.dtype == torch.float64
    torch.testing.assert_close(capture.logits, expected, atol=1e-10, rtol=1e-10)
    if torch.cuda.is_available():
        model.to("cuda")
        with torch.no_grad():
            model(images.double().cuda())
        assert capture.logits.device.type == "cuda"
        torch.testing.assert_close(capture.logits.cpu(), expected, atol=1e-8, rtol=1e-8)
    capture.remove()


def test_keeps_only_the_latest_forward() -> None:
    model, images = make_model("se_vit_tiny_patch4_32")
    with AttentionCapture(model) as capture:
        model(images)
        first = weakref.ref(capture.logits._base)
        model(images[:1])
        gc.collect()
        assert first() is None
        assert capture.logits.shape[0] == 1


def test_remove_detaches_the_hooks() -> None:
    model, images = make_model("se_vit_tiny_patch4_32")
    with AttentionCapture(model) as capture:
        model(images)
    assert not model.blocks[-1].attn.qkv._forward_hooks
    assert not model.patch_embed._forward_pre_hooks
    model(images[:1])
    assert capture.logits.shape[0] == 2  # the last capture stays readable, no longer updated


def test_before_any_forward_raises() -> None:
    model, _ = make_model("se_vit_tiny_patch4_32")
    capture = AttentionCapture(model)
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = capture.logits
    capture.remove()


def test_model_without_class_token_raises_value_error() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", depth=1, class_token=False, global_pool="avg", img_size=32
    )
    with pytest.raises(ValueError, match=r"spatial entropy needs a \[CLS\] query"):
        AttentionCapture(model)


@pytest.mark.parametrize(
    "model",
    [
        nn.Linear(4, 4),
        timm.create_model("eva02_tiny_patch14_224", depth=1, img_size=28),
    ],
    ids=["linear", "eva02"],
)
def test_unsupported_architecture_raises_type_error(model: nn.Module) -> None:
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        AttentionCapture(model)


def test_patch_dropout_is_reported() -> None:
    model = timm.create_model("se_vit_tiny_patch4_32", depth=1, patch_drop_rate=0.5)
    with AttentionCapture(model), pytest.raises(RuntimeError, match="patch dropout"):
        model(torch.randn(1, 3, 32, 32))


def test_distributed_data_parallel_model(tmp_path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model, images = make_model("se_vit_tiny_patch4_32")
        ddp = nn.parallel.DistributedDataParallel(model)
        with AttentionCapture(ddp) as capture:
            ddp(images)
            spatial_entropy(capture.logits, capture.grid_shape).mean().backward()
        with torch.no_grad():
            expected = explicit_cls_logits(model, images)[..., 1:]
        torch.testing.assert_close(capture.logits.detach(), expected, atol=1e-5, rtol=1e-5)
        assert model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("older_timm", [False, True])
def test_convit_last_block_logits_match_explicit_computation(older_timm: bool) -> None:
    # ConViT's last blocks are plain multi-head attention (timm's MHSA, not Attention).
    # timm before 1.0.31 (the lent GPU's 1.0.29) has no ConVit.num_prefix_tokens: one class token.
    torch.manual_seed(0)
    model = timm.create_model(
        "convit_tiny", pretrained=False, depth=3, local_up_to_layer=1, img_size=32, num_classes=5
    )
    if older_timm:
        del model.num_prefix_tokens
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images = torch.randn(2, 3, 32, 32)
    seen = []
    block = model.blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with AttentionCapture(model) as capture:
        model(images)
    handle.remove()
    x = block.norm1(seen[0])
    dim, heads = x.shape[-1], block.attn.num_heads
    head_dim = dim // heads
    weight = block.attn.qkv.weight  # ConViT's qkv has no bias
    q = (x @ weight[:dim].T).reshape(*x.shape[:2], heads, head_dim)
    k = (x @ weight[dim : 2 * dim].T).reshape(*x.shape[:2], heads, head_dim)
    expected = torch.einsum("bhd,bjhd->bhj", q[:, 0], k) / head_dim**0.5
    assert capture.grid_shape == (2, 2)
    assert capture.logits.shape == (2, heads, 4)
    torch.testing.assert_close(capture.logits, expected[..., 1:], atol=1e-5, rtol=1e-5)
