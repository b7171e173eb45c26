"""Capture the last block's [CLS]-to-patch attention of a timm Vision Transformer via hooks."""

from __future__ import annotations

import sys

import torch
from timm.layers import Attention
from timm.models.convit import MHSA, ConVit
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.hooks import RemovableHandle

__all__ = ["AttentionCapture", "PatchGridTracker", "num_prefix_tokens", "unwrap_model"]

# Attention modules whose fused q/k/v projection `qkv` the capture reads: timm's ViT attention,
# and ConViT's plain multi-head attention (its last blocks; the GPSA blocks before them are not).
SUPPORTED_ATTENTION = (Attention, MHSA)


def num_prefix_tokens(vit: nn.Module) -> int | None:
    """The tokens before the patch grid in ``vit``'s sequence (class and register tokens):
    timm's ``num_prefix_tokens``, or 1 for a ConViT of a timm older than 1.0.31, which prepends
    its class token before the last blocks but does not have the attribute. ``None`` when
    unknown."""
    count = getattr(vit, "num_prefix_tokens", None)
    if count is None and isinstance(vit, ConVit):
        return 1
    return count if isinstance(count, int) else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers and the
    wrapper that ``torch.compile(model)`` returns, in any nesting; its ``state_dict`` has the
    plain keys (no ``module.`` or ``_orig_mod.`` prefix) and it runs eagerly."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    # A compiled model exists only once torch._dynamo was imported; importing it here would
    # cost every caller seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


class PatchGridTracker:
    """Record the ``(gh, gw)`` patch grid of each forward pass of a timm ViT.

    A forward pre-hook on ``patch_embed`` reads the input image size and asks the patch
    embedding for its grid, so ``dynamic_img_size`` models fed any (non-square) size work.
    Shared by every capture that lays tokens out on the grid.

    Args:
        patch_embed: the model's ``patch_embed`` (a timm ``PatchEmbed`` with
            ``dynamic_feat_size``).
    """

    def __init__(self, patch_embed: nn.Module) -> None:
        self._grid_shape: tuple[int, int] | None = None
        self._handle = patch_embed.register_forward_pre_hook(self._on_patch_embed)

    def _on_patch_embed(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        height, width = args[0].shape[-2:]
        self._grid_shape = tuple(module.dynamic_feat_size((height, width)))

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(gh, gw)`` patch grid of the latest forward pass."""
        if self._grid_shape is None:
            raise RuntimeError("no forward pass has been captured yet")
        return self._grid_shape

    def check_tokens(self, tokens: int, num_prefix_tokens: int, where: str) -> tuple[int, int]:
        """The grid of the running forward pass, checked against a token count seen there.

        Raises:
            RuntimeError: no ``patch_embed`` call preceded, or the count is not
                ``num_prefix_tokens + gh * gw`` (e.g. patch dropout).
        """
        if self._grid_shape is None:
            raise RuntimeError(f"{where} ran without patch_embed; call the model itself")
        gh, gw = self._grid_shape
        if tokens - num_prefix_tokens != gh * gw:
            raise RuntimeError(
                f"expected {num_prefix_tokens} prefix + {gh}x{gw} patch tokens in {where}, got "
                f"{tokens} tokens; patch dropout (patch_drop_rate) is not supported"
            )
        return gh, gw

    def remove(self) -> None:
        self._handle.remove()


class AttentionCapture:
    """Record the last block's [CLS] attention of a timm ViT on every forward pass.

    Two forward hooks are attached: one on ``patch_embed`` reads the input image size to get
    the patch grid (so ``dynamic_img_size`` models fed any size work), one on the last block's
    ``attn.qkv`` Linear takes the q and k that the block computes anyway. Only the [CLS] row
    ``q_cls . k_j * scale`` is formed, ``(B, heads, N_all)``, so timm's fused attention can stay
    on and no ``N x N`` matrix is built. ``q_norm``/``k_norm`` are applied exactly as the block
    applies them. Only the latest forward pass is kept.

    Supported: ``timm.models.VisionTransformer`` and subclasses (DeiT, distilled DeiT, register
    tokens, ``qk_norm``, ``dynamic_img_size``) whose last block uses ``timm.layers.Attention``,
    and timm's ConViT (its last block is plain multi-head attention); models wrapped in
    ``DistributedDataParallel``/``DataParallel``. With ``torch.compile``, attach the capture
    first, then compile: dynamo traces the hooks into the graph and ``logits`` keeps its
    gradient. Hooks added after the compiled model's first call do not run (dynamo does not
    guard on hooks by default), and nothing is captured.

    Args:
        model: a timm Vision Transformer with a class token.

    Attributes:
        num_heads: heads of the last block, the maps per image.

    Attributes (after a forward pass):
        logits: ``(B, heads, gh * gw)`` pre-softmax [CLS]-query logits over the patch keys
            (prefix tokens excluded), row-major over the grid, float32 (float64 for a float64
            model) even under autocast, with the autograd graph, so a loss on it trains q/k.
        attention: ``(B, heads, gh * gw)`` post-softmax [CLS] attention (softmax over all keys,
            prefix tokens included, then the patch entries).
        grid_shape: ``(gh, gw)``.

    Raises:
        TypeError: the model is not a supported timm ViT.
        ValueError: the model has no class token.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", depth=2, pretrained=False)
        >>> with AttentionCapture(model) as capture:
        ...     _ = model(torch.randn(2, 3, 224, 224))
        >>> capture.logits.shape, capture.grid_shape
        (torch.Size([2, 3, 196]), (14, 14))
    """

    def __init__(self, model: nn.Module) -> None:
        vit = unwrap_model(model)
        blocks = getattr(vit, "blocks", None)
        patch_embed = getattr(vit, "patch_embed", None)
        if (
            not isinstance(blocks, nn.Sequential | nn.ModuleList)
            or len(blocks) == 0
            or not isinstance(getattr(blocks[-1], "attn", None), SUPPORTED_ATTENTION)
            or not hasattr(patch_embed, "dynamic_feat_size")
            or num_prefix_tokens(vit) is None
        ):
            raise TypeError(
                "AttentionCapture expects a timm VisionTransformer-style model (blocks[-1].attn a "
                "timm.layers.Attention or ConViT MHSA, a patch_embed with dynamic_feat_size, "
                "num_prefix_tokens), "
                f"but got {type(vit).__name__}"
            )
        if getattr(vit, "cls_token", None) is None:
            raise ValueError("spatial entropy needs a [CLS] query; this model has none")

        self._attn: Attention | MHSA = blocks[-1].attn
        self.num_prefix_tokens: int = num_prefix_tokens(vit)
        self.num_heads: int = self._attn.num_heads
        self._head_dim: int = self._attn.qkv.out_features // (3 * self.num_heads)
        # ConViT's attention has no q/k normalisation.
        self._q_norm = getattr(self._attn, "q_norm", nn.Identity())
        self._k_norm = getattr(self._attn, "k_norm", nn.Identity())
        self._cls_scores: Tensor | None = None
        self._grid = PatchGridTracker(patch_embed)
        self._handles: list[RemovableHandle] = [self._attn.qkv.register_forward_hook(self._on_qkv)]

    def _on_qkv(self, module: nn.Module, args: tuple[Tensor, ...], qkv: Tensor) -> None:
        attn = self._attn
        batch, tokens, _ = qkv.shape
        self._grid.check_tokens(tokens, self.num_prefix_tokens, "the last block")
        # Same layout as timm's Attention.forward: (B, N, 3, heads, head_dim).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self._head_dim)
        q_cls = self._q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, heads, 1, head_dim)
        keys = self._k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, heads, N_all, head_dim)
        # The loss wants float32 logits; under autocast the product would drop to half precision.
        dtype = torch.promote_types(keys.dtype, torch.float32)
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            scores = (q_cls.to(dtype) * attn.scale) @ keys.to(dtype).transpose(-2, -1)
        self._cls_scores = scores.squeeze(2)

    def _scores(self) -> Tensor:
        if self._cls_scores is None:
            raise RuntimeError("no forward pass has been captured yet")
        return self._cls_scores

    @property
    def logits(self) -> Tensor:
        """``(B, heads, gh * gw)`` pre-softmax [CLS] logits over the patch keys."""
        return self._scores()[..., self.num_prefix_tokens :]

    @property
    def attention(self) -> Tensor:
        """``(B, heads, gh * gw)`` [CLS] attention: softmax over all keys, patch entries kept."""
        return self._scores().softmax(dim=-1)[..., self.num_prefix_tokens :]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(gh, gw)`` patch grid of the latest forward pass."""
        return self._grid.grid_shape

    def remove(self) -> None:
        """Detach the hooks; the latest capture stays readable."""
        self._grid.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
