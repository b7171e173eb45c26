"""Model factory: timm ViTs by name, small registered presets, "no last skip", local checkpoints.

Besides plain ViTs, two presets carry an architectural local bias, the comparisons of the
second data-efficiency benchmark (benchmarks/evidence_v2.py): a ConViT (timm's ``ConVit``,
gated positional self-attention) and a ViT with a convolutional stem.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

import timm
from timm.layers import HybridEmbed
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    clean_state_dict,
    generate_default_cfgs,
    load_state_dict,
    register_model,
)
from timm.models.convit import ConVit
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from timm.models.vision_transformer_hybrid import ConvStem
from torch import Tensor, nn

from .attention import unwrap_model
from .checkpoint import latest_checkpoint, read_file

__all__ = [
    "ConvStemEmbed",
    "NoSkipAttentionBlock",
    "check_model_name",
    "compile_model",
    "create_model",
    "load_checkpoint_into",
    "remove_last_skip",
    "se_convit_small_patch4_56",
    "se_vit_convstem_small_56",
    "se_vit_small_patch4_56",
    "se_vit_small_patch8_64",
    "se_vit_tiny_patch4_32",
]

_logger = logging.getLogger(__name__)

# File name of a model's weights inside a checkpoint directory (our own format).
MODEL_WEIGHTS_NAME = "model.safetensors"


def _preset_cfg(input_size: tuple[int, int, int]) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": input_size,
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


# Read by timm's register_model: gives the presets their default input size and class count.
default_cfgs = generate_default_cfgs(
    {
        "se_vit_tiny_patch4_32": _preset_cfg((3, 32, 32)),
        "se_vit_small_patch8_64": _preset_cfg((3, 64, 64)),
        "se_vit_small_patch4_56": _preset_cfg((3, 56, 56)),
        "se_convit_small_patch4_56": _preset_cfg((3, 56, 56)),
        "se_vit_convstem_small_56": _preset_cfg((3, 56, 56)) | {"first_conv": None},
    }
)


def _create_preset(variant: str, pretrained: bool, **kwargs) -> VisionTransformer:
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


@register_model
def se_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 images (CIFAR-size), patch 4 (8x8 grid), width 192, depth 6, 3 heads.

    2,693,578 parameters with the default 10 classes and 3 input channels.
    """
    model_args = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3)
    return _create_preset("se_vit_tiny_patch4_32", pretrained, **dict(model_args, **kwargs))


@register_model
def se_vit_small_patch8_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 64x64 images, patch 8 (8x8 grid), width 128, depth 6, 4 heads.

    The model of the data-efficiency benchmark (cluttered Fashion-MNIST); width 128 keeps a
    training run within reach of two CPU cores. 1,224,330 parameters with the default 10
    classes and 3 input channels (1,207,946 with ``in_chans=1``).
    """
    model_args = dict(patch_size=8, embed_dim=128, depth=6, num_heads=4)
    return _create_preset("se_vit_small_patch8_64", pretrained, **dict(model_args, **kwargs))


@register_model
def se_vit_small_patch4_56(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 56x56 images, patch 4 (the paper's 14x14 grid), width 128, depth 6, 4 heads.

    The benchmark ViT of ``se_vit_small_patch8_64`` at the 14x14 grid (the second
    data-efficiency benchmark: cluttered Fashion-MNIST resized from 64 to 56 px). 1,218,698
    parameters with 10 classes and ``in_chans=1``.
    """
    model_args = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4)
    return _create_preset("se_vit_small_patch4_56", pretrained, **dict(model_args, **kwargs))


@register_model
def se_convit_small_patch4_56(pretrained: bool = False, **kwargs) -> ConVit:
    """ConViT (d'Ascoli et al., timm's ``ConVit``) shaped like ``se_vit_small_patch4_56``.

    56x56 input, patch 4 (14x14 grid), width 128, depth 6, 4 heads; gated positional
    self-attention (GPSA, initialised local) in all but the last two blocks, which are plain
    multi-head self-attention with the [CLS] token (ConViT adds it after the GPSA blocks).
    timm's ConViT keeps ``qkv_bias=False``. 1,216,346 parameters with 10 classes and
    ``in_chans=1``.
    """
    # timm's ConVit multiplies embed_dim by num_heads (width = 32 x 4 = 128).
    model_args = dict(patch_size=4, embed_dim=32, depth=6, num_heads=4, local_up_to_layer=4)
    return build_model_with_cfg(
        ConVit, "se_convit_small_patch4_56", pretrained, **dict(model_args, **kwargs)
    )


class ConvStemEmbed(HybridEmbed):
    """A convolutional stem in place of the patchify layer (Xiao et al., "Early convolutions
    help transformers see better"): ``log2(patch_size)`` stride-2 3x3 conv-BN-ReLU layers with
    ``embed_dim / 4, embed_dim / 2, ...`` channels, then a 1x1 conv to ``embed_dim`` (timm's
    ``ConvStem``), so each token sees a ``patch_size``-strided, overlapping receptive field.

    Built by timm's ``VisionTransformer`` as its ``embed_layer`` (same keywords as
    ``PatchEmbed``).

    Args:
        img_size: input side.
        patch_size: total stride, a power of two >= 2: the grid is ``img_size / patch_size``.
        in_chans: input channels.
        embed_dim: token width.
        **kwargs: passed to timm's ``HybridEmbed`` (``bias`` is the stem's own, dropped).

    Shape:
        - Input: ``(B, in_chans, H, W)``. Output: ``(B, H * W / patch_size**2, embed_dim)``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 56,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        **kwargs,
    ) -> None:
        depth = int(math.log2(patch_size)) if patch_size >= 2 else 0
        if 2**depth != patch_size:
            raise ValueError(
                f"ConvStemEmbed needs a power-of-two patch_size >= 2, got {patch_size}"
            )
        channels = tuple(embed_dim // 2 ** (depth - i) for i in range(depth)) + (embed_dim,)
        stem = ConvStem(
            in_chans,
            depth=depth + 1,
            channels=channels,
            kernel_size=(3,) * depth + (1,),
            stride=(2,) * depth + (1,),
        )
        kwargs.pop("bias", None)  # the stem's last conv has its own bias
        super().__init__(
            stem, img_size=img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim,
            proj=False, **kwargs,
        )  # fmt: skip


@register_model
def se_vit_convstem_small_56(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """``se_vit_small_patch4_56`` with a convolutional stem (:class:`ConvStemEmbed`) in place of
    the patchify layer: 56x56 input, 14x14 grid, width 128, depth 6, 4 heads. 1,243,754
    parameters with 10 classes and ``in_chans=1``.
    """
    model_args = dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, embed_layer=ConvStemEmbed)
    return _create_preset("se_vit_convstem_small_56", pretrained, **dict(model_args, **kwargs))


class NoSkipAttentionBlock(nn.Module):
    """A timm ViT ``Block`` without the attention residual and with ``norm2`` as identity.

    The published "no last skip" variant (Peruzzo et al.): ``x = ls1(attn(norm1(x)))``, then
    ``x = x + drop_path2(ls2(mlp(x)))``. It adopts the block's own submodules, so parameter
    names (and checkpoints) stay those of the original block minus ``norm2``.

    Args:
        block: the ``timm.models.vision_transformer.Block`` to convert.

    Shape:
        - Input: ``(B, N, C)``. Output: ``(B, N, C)``.
    """

    def __init__(self, block: Block) -> None:
        super().__init__()
        if type(block) is not Block:
            raise TypeError(
                "no_last_skip needs a timm vision_transformer.Block (pre-norm, attention then "
                f"MLP) as the last block, but got {type(block).__name__}"
            )
        self.norm1 = block.norm1
        self.attn = block.attn
        self.ls1 = block.ls1
        self.norm2 = nn.Identity()
        self.mlp = block.mlp
        self.ls2 = block.ls2
        self.drop_path2 = block.drop_path2

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        # No drop path on the attention branch: without its residual, dropping the branch
        # would erase every token of the sample.
        x = self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def remove_last_skip(model: nn.Module) -> nn.Module:
    """Turn the last block of a timm ViT into a :class:`NoSkipAttentionBlock`, in place.

    Args:
        model: a timm ``VisionTransformer`` (or a DDP-wrapped one).

    Returns:
        The same model, for chaining.
    """
    vit = unwrap_model(model)
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise TypeError(f"expected a timm VisionTransformer with blocks, got {type(vit).__name__}")
    blocks[-1] = NoSkipAttentionBlock(blocks[-1])
    return model


def create_model(
    name: str,
    *,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    no_last_skip: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **timm_kwargs,
) -> nn.Module:
    """Build a timm Vision Transformer by name, never downloading weights.

    Args:
        name: any timm ViT name (``vit_*``, ``deit_*``, ...), a timm ConViT (``convit_*``) or one
            of our presets (``se_vit_tiny_patch4_32``, ``se_vit_small_patch8_64``,
            ``se_vit_small_patch4_56``, ``se_convit_small_patch4_56``,
            ``se_vit_convstem_small_56``). Only ViTs support ``no_last_skip`` and the attention
            capture; a ConViT's last block is not a timm ``Attention``.
        num_classes: classifier outputs.
        img_size: input size, ``int`` or ``(H, W)``; ``None`` keeps the model's default.
        in_chans: input channels.
        drop_path_rate: stochastic depth rate.
        no_last_skip: remove the last block's attention residual (see
            :class:`NoSkipAttentionBlock`).
        checkpoint: local weights to load (see :func:`load_checkpoint_into`).
        **timm_kwargs: passed to ``timm.create_model`` (``depth``, ``qk_norm``,
            ``reg_tokens``, ``dynamic_img_size``, ...).

    Returns:
        The model, in training mode, on the CPU.

    Example:
        >>> import torch
        >>> model = create_model("se_vit_small_patch8_64", num_classes=10, in_chans=1)
        >>> model(torch.randn(2, 1, 64, 64)).shape
        torch.Size([2, 10])
    """
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    check_model_name(name)
    if img_size is not None:
        timm_kwargs["img_size"] = img_size
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **timm_kwargs,
    )
    if not isinstance(model, VisionTransformer | ConVit):
        raise TypeError(
            f"create_model builds timm Vision Transformers (and ConViT); {name!r} is a "
            f"{type(model).__name__}"
        )
    if no_last_skip:
        remove_last_skip(model)
    if checkpoint is not None:
        load_checkpoint_into(model, checkpoint)
    return model


def check_model_name(name: str) -> None:
    """Raise a ValueError when timm knows no model ``name``, suggesting the closest of timm's
    models and our presets (a ``.tag`` suffix and ``hf-hub:`` names are left to timm).

    Example:
        >>> check_model_name("vit_smal_patch16_224")
        Traceback (most recent call last):
        ...
        ValueError: unknown model 'vit_smal_patch16_224'; did you mean 'vit_small_patch16_224', ...
    """
    if ":" in name or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(repr(c) for c in close)}?"
        if close
        else "timm.list_models('*vit*') lists the Vision Transformers"
    )
    raise ValueError(f"unknown model {name!r}; {hint}")


def compile_model(model: nn.Module, backend: str = "inductor", mode: str = "default") -> nn.Module:
    """``torch.compile(model, backend=backend, mode=mode)``, after checking that this PyTorch
    can compile.

    Compile after wrapping in ``DistributedDataParallel`` (as timm does; dynamo then splits
    the graph at DDP's gradient buckets) and after attaching forward hooks such as
    :class:`~spatial_entropy.attention.AttentionCapture`: dynamo traces the hooks into the
    graph, while hooks added after the first compiled call never run. The returned wrapper
    shares the model's parameters; :func:`~spatial_entropy.attention.unwrap_model` returns the
    model itself (plain ``state_dict`` keys, eager forward).

    Args:
        model: the module to compile (possibly DDP-wrapped).
        backend: a registered ``torch.compile`` backend: ``"inductor"`` generates fused
            kernels (C++ on CPU, Triton on GPU; the first step compiles, tens of seconds),
            ``"aot_eager"`` traces forward and backward without generating code (for tests).
        mode: inductor's mode (:data:`~spatial_entropy.choices.COMPILE_MODES`):
            ``"reduce-overhead"`` records the compiled forward and backward as CUDA graphs and
            replays them, one launch each, which pays on a GPU when a step is many small kernels
            (a small model); the other backends take only ``"default"``.

    Raises:
        RuntimeError: this PyTorch has no ``torch.compile`` on this Python or platform.
        ValueError: ``backend`` is not a registered backend.
    """
    import torch._dynamo  # seconds to import: only when compiling

    if not torch._dynamo.is_dynamo_supported():
        raise RuntimeError(
            f"compile: true needs torch.compile, which torch {torch.__version__} does not "
            f"support on Python {sys.version.split()[0]} ({platform.system()}); set compile: false"
        )
    backends = torch._dynamo.list_backends(exclude_tags=())
    if backend not in backends:
        close = difflib.get_close_matches(backend, backends, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown torch.compile backend {backend!r} (compile_backend); {hint}"
            f"registered: {', '.join(backends)}"
        )
    if mode != "default" and backend != "inductor":
        raise ValueError(f"compile_mode {mode!r} needs the inductor backend, not {backend!r}")
    return torch.compile(model, backend=backend, mode=None if mode == "default" else mode)


def _read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(checkpoint, Mapping):
        state_dict = checkpoint
        for key in ("state_dict", "model"):
            if isinstance(state_dict.get(key), Mapping):
                state_dict = state_dict[key]
                break
        return clean_state_dict(dict(state_dict))
    path = Path(checkpoint)
    if path.is_dir():
        # Without model.safetensors it is a training run: take the checkpoint `latest` names.
        stem = None if (path / MODEL_WEIGHTS_NAME).is_file() else latest_checkpoint(path)
        path = path / MODEL_WEIGHTS_NAME if stem is None else stem.with_suffix(".safetensors")
    elif not path.exists() and path.with_suffix(".safetensors").is_file():
        path = path.with_suffix(".safetensors")  # a checkpoint stem, e.g. run/step_00000100
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} (expected a .safetensors/.pth/.pt file, a training "
            f"checkpoint directory, or a directory holding {MODEL_WEIGHTS_NAME})"
        )
    # timm's reader: safetensors or torch.load(weights_only=True); takes 'state_dict'/'model'
    # from training checkpoints and strips DDP 'module.' / torch.compile prefixes.
    return read_file(path, lambda name: load_state_dict(name, use_ema=False))


def load_checkpoint_into(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = False,
) -> nn.Module:
    """Load local weights into a timm ViT, adapting them where fine-tuning needs it.

    Accepts a ``.safetensors`` file; a ``.pth``/``.pt`` file read with
    ``torch.load(weights_only=True)``; a directory holding ``model.safetensors``; a training
    run directory written by :func:`spatial_entropy.checkpoint.save_checkpoint` (its ``latest``
    checkpoint) or one such checkpoint's stem (``run/step_00000100``); or an already loaded
    state dict. Training checkpoints (DeiT's ``{'model': ...}``, ``state_dict``) and ``module.``
    prefixes are unwrapped. Then:

    - position embeddings are resampled when the grid differs
      (``timm.layers.resample_abs_pos_embed``, via timm's ViT checkpoint filter);
    - the patch embedding is adapted when the input channels differ;
    - classifier weights (``head``, ``head_dist``) whose shape differs are skipped, so the
      model keeps its freshly initialised head (fine-tuning to another class count);
    - a standard checkpoint fits a ``no_last_skip`` model (its last ``norm2`` is dropped).

    With ``strict`` none of this happens: the weights must be the model's own, every key and
    shape equal (evaluating a run, where a silently new head would be a wrong answer).

    Args:
        model: a timm ``VisionTransformer`` (DDP wrappers are unwrapped).
        checkpoint: path or state dict.
        strict: load the weights as they are, without adapting them.

    Returns:
        The same model.

    Raises:
        FileNotFoundError: the path holds no checkpoint.
        UnreadableFileError: the file is truncated or corrupt (a ValueError naming it).
        ValueError: keys or shapes do not fit; lists every missing, unexpected and mismatched
            key. The model is left untouched.
    """
    vit = unwrap_model(model)
    state_dict = _read_state_dict(checkpoint)
    own = vit.state_dict()
    skipped_head: set[str] = set()
    if not strict:
        state_dict, skipped_head = _adapt_for_fine_tuning(vit, state_dict, own)

    missing = sorted(own.keys() - state_dict.keys() - skipped_head)
    unexpected = sorted(state_dict.keys() - own.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint does not fit {type(vit).__name__}: missing keys {missing}; "
            f"unexpected keys {unexpected}; size mismatches {mismatched}"
        )
    vit.load_state_dict(state_dict, strict=False)
    return model


def _adapt_for_fine_tuning(
    vit: nn.Module, state_dict: dict[str, Tensor], own: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], set[str]]:
    """The adaptations of :func:`load_checkpoint_into`; returns the state dict and the
    classifier keys left out because their shape differs."""
    state_dict = checkpoint_filter_fn(state_dict, vit)
    for name, module in vit.named_modules():
        if isinstance(module, NoSkipAttentionBlock):
            norm2 = f"{name}.norm2."
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(norm2)}

    conv = "patch_embed.proj.weight"
    if conv in state_dict and conv in own and state_dict[conv].shape[1] != own[conv].shape[1]:
        state_dict[conv] = adapt_input_conv(own[conv].shape[1], state_dict[conv])

    classifiers = getattr(vit, "pretrained_cfg", {}).get("classifier", "head")
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    skipped_head = {
        k
        for k, v in state_dict.items()
        if k.split(".")[0] in classifiers and k in own and v.shape != own[k].shape
    }
    if skipped_head:
        _logger.info("classifier shape differs; keeping a new head (%s)", sorted(skipped_head))
        state_dict = {k: v for k, v in state_dict.items() if k not in skipped_head}
    return state_dict, skipped_head
