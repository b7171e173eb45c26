"""Auxiliary losses the engine adds to the task loss, behind one small interface."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from spatial_entropy.attention import (
    AttentionCapture,
    PatchGridTracker,
    num_prefix_tokens,
    unwrap_model,
)
from spatial_entropy.drloc import DRLocHead, drloc_loss, sample_position_pairs
from spatial_entropy.entropy import SpatialEntropyLoss, se_weight

__all__ = ["DRLocRegularizer", "Regularizer", "SpatialEntropyRegularizer"]


@runtime_checkable
class Regularizer(Protocol):
    """An auxiliary loss computed from what the model did in its latest forward pass.

    The engine calls ``attach(model)`` once, ``set_progress(t, total)`` before each step,
    and after each forward ``reg()``, which returns the *weighted* term to add to the task loss.
    ``stats()`` gives the values of the latest call for logging (floats or 0-dim tensors,
    so that logging need not synchronise the device every step).

    A regulariser may own what the model does not, and the engine keeps it apart from the model:

    - ``module``: an ``nn.Module`` with the regulariser's **trainable parameters**, or ``None``.
      Exists after ``attach`` and lives on the model's device. The engine optimises its
      parameters together with the model's, may replace it by a ``DistributedDataParallel``
      wrapper of itself (the regulariser calls whatever ``module`` holds, so the wrapper
      all-reduces its gradients), saves ``unwrap_model(module).state_dict()`` in training
      checkpoints and restores it there. It is never part of the model: not in
      ``model.safetensors``, not in the EMA copy.
    - ``state_dict()`` / ``load_state_dict(state)``: the regulariser's other state, such as a
      random stream, as tensors and plain Python values (``torch.load(weights_only=True)``
      reads it). It may differ between DDP ranks, so the engine saves and restores it per rank,
      like the global RNG states; restoring it makes the next steps bitwise the same.
    """

    name: str
    module: nn.Module | None

    def attach(self, model: nn.Module) -> None: ...

    def set_progress(self, t: float, total: float) -> None: ...

    def __call__(self) -> Tensor: ...

    def stats(self) -> dict[str, float | Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def remove(self) -> None: ...


class SpatialEntropyRegularizer:
    """``weight(t) * SE`` of the last block's [CLS] attention (Peruzzo et al.).

    Args:
        weight: peak lambda (published: 0.01).
        schedule: ``"constant"`` or ``"warmup_cosine"`` (see :func:`se_weight`).
        warmup: warm-up length, in the unit of ``t`` passed to :meth:`set_progress` (epochs).

    While lambda is 0 (the start of the warm-up) the entropy is still computed for logging,
    but without a graph, so the step costs no extra backward.
    """

    name = "se"
    module = None  # no trainable parameters

    def __init__(self, weight: float, schedule: str = "warmup_cosine", warmup: float = 10.0):
        self.weight = weight
        self.schedule = schedule
        self.warmup = warmup
        self.loss = SpatialEntropyLoss()
        self.current_weight = 0.0
        self._capture: AttentionCapture | None = None
        self._value: Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        self._capture = AttentionCapture(model)

    def set_progress(self, t: float, total: float) -> None:
        self.current_weight = se_weight(
            t, total, weight=self.weight, schedule=self.schedule, warmup=self.warmup
        )

    def __call__(self) -> Tensor:
        if self._capture is None:
            raise RuntimeError("call attach(model) before using the regulariser")
        logits, grid_shape = self._capture.logits, self._capture.grid_shape
        if self.current_weight == 0.0 or not torch.is_grad_enabled():
            with torch.no_grad():
                self._value = self.loss(logits, grid_shape)
            return self._value.new_zeros(())
        value = self.loss(logits, grid_shape)
        self._value = value.detach()
        return self.current_weight * value

    def stats(self) -> dict[str, float | Tensor]:
        stats: dict[str, float | Tensor] = {"se_weight": self.current_weight}
        if self._value is not None:
            stats["se"] = self._value
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Empty: the weight follows from :meth:`set_progress`, nothing else persists."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"SpatialEntropyRegularizer has no state, got keys {sorted(state)}")

    def remove(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None


class DRLocRegularizer:
    """``weight * DRLoc`` on the final patch-token embeddings (Liu et al., NeurIPS 2021).

    ``attach(model)`` hooks the model's final ``norm`` (its output, prefix tokens such as
    [CLS], distillation and register tokens removed, is the ``(B, gh * gw, D)`` patch-token
    embedding; for ``global_pool="avg"`` models that norm is an identity and the tokens are
    those fed to the pooling; the reference code reads its ViT and Swin tokens before the final
    norm) and ``patch_embed`` (for the grid, so ``dynamic_img_size`` and
    non-square inputs work), and builds the localisation MLP :class:`DRLocHead` on the
    model's device as :attr:`module`. No [CLS] token is needed.

    Each call draws ``pairs`` position pairs per image (:func:`sample_position_pairs`) with the
    regulariser's own ``torch.Generator``, created on the embeddings' device at the first call
    and seeded with ``seed``, so the draw needs no host sync, does not touch the global RNG
    streams, and is reproducible; :meth:`state_dict` holds the generator state. The loss is
    :func:`drloc_loss` (mean over pairs and images). Under ``torch.no_grad`` (evaluation) a call
    returns 0 and draws nothing, so evaluating does not shift the training samples.

    Args:
        weight: lambda, constant (paper: 0.1 for T2T-ViT/CvT, 0.5 for Swin, on the reference
            code's loss scale, see :func:`~spatial_entropy.drloc.drloc_loss`).
        pairs: position pairs per image ``m`` (reference: 64).
        hidden: width of the MLP's two hidden layers (reference: 512).
        seed: seed of the sampling stream; under DDP give each rank its own.

    Raises:
        ValueError: ``weight`` < 0, ``pairs`` or ``hidden`` < 1.
        TypeError: from :meth:`attach`, a model that is not a timm ViT-style model.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_tiny_patch16_224", depth=1, class_token=False,
        ...                           global_pool="avg", img_size=64)
        >>> drloc = DRLocRegularizer(0.1, pairs=8, hidden=32)
        >>> drloc.attach(model)
        >>> _ = model(torch.randn(2, 3, 64, 64))
        >>> drloc().shape
        torch.Size([])
    """

    name = "drloc"

    def __init__(self, weight: float, pairs: int = 64, hidden: int = 512, seed: int = 0) -> None:
        if weight < 0 or pairs < 1 or hidden < 1:
            raise ValueError(
                f"DRLocRegularizer expects weight >= 0, pairs >= 1, hidden >= 1, got "
                f"weight={weight}, pairs={pairs}, hidden={hidden}"
            )
        self.weight = weight
        self.pairs = pairs
        self.hidden = hidden
        self.seed = seed
        self.module: nn.Module | None = None
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._grid: PatchGridTracker | None = None
        self._handles: list[RemovableHandle] = []
        self._num_prefix_tokens = 0
        self._tokens: Tensor | None = None
        self._grid_shape: tuple[int, int] | None = None
        self._value: Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        vit = unwrap_model(model)
        patch_embed, norm = getattr(vit, "patch_embed", None), getattr(vit, "norm", None)
        embed_dim = getattr(vit, "num_features", None)
        if (
            not hasattr(patch_embed, "dynamic_feat_size")
            or not isinstance(norm, nn.Module)
            or num_prefix_tokens(vit) is None
            or not isinstance(embed_dim, int)
        ):
            raise TypeError(
                "DRLocRegularizer expects a timm VisionTransformer-style model (a patch_embed "
                "with dynamic_feat_size, a final norm, num_prefix_tokens, num_features), "
                f"but got {type(vit).__name__}"
            )
        self.remove()
        self._num_prefix_tokens = num_prefix_tokens(vit)
        self._grid = PatchGridTracker(patch_embed)
        self._handles = [norm.register_forward_hook(self._on_norm)]
        reference = next(vit.parameters())
        self.module = DRLocHead(embed_dim, self.hidden).to(reference.device, reference.dtype)

    def _on_norm(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if output.ndim != 3:
            raise RuntimeError(
                f"DRLoc expects the final norm to output (B, tokens, D), got {tuple(output.shape)}"
            )
        self._grid_shape = self._grid.check_tokens(
            output.shape[1], self._num_prefix_tokens, "the final norm"
        )
        self._tokens = output[:, self._num_prefix_tokens :]

    @property
    def tokens(self) -> Tensor:
        """``(B, gh * gw, D)`` patch tokens of the latest forward pass, with their graph."""
        if self._tokens is None:
            raise RuntimeError("no forward pass has been captured yet")
        return self._tokens

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(gh, gw)`` patch grid of the latest forward pass."""
        if self._grid_shape is None:
            raise RuntimeError("no forward pass has been captured yet")
        return self._grid_shape

    def set_progress(self, t: float, total: float) -> None:
        """Nothing to do: the weight is constant, as in the reference."""

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is not None:
            if self._generator.device != device:
                raise RuntimeError(
                    f"DRLoc samples on {self._generator.device} but the model now runs on "
                    f"{device}; move the model before its first training step"
                )
            return self._generator
        generator = torch.Generator(device=device).manual_seed(self.seed)
        pending = self._pending_state
        if pending is not None and pending["generator"] is not None:
            if pending["device_type"] != device.type:
                raise ValueError(
                    f"DRLoc sampling state was saved on {pending['device_type']}, "
                    f"this run samples on {device.type}; their streams are not compatible"
                )
            generator.set_state(pending["generator"])
        self._generator, self._pending_state = generator, None
        return generator

    def __call__(self) -> Tensor:
        if self.module is None or self._grid is None:
            raise RuntimeError("call attach(model) before using the regulariser")
        tokens, grid_shape = self.tokens, self.grid_shape
        if not torch.is_grad_enabled():
            return tokens.new_zeros((), dtype=torch.float32)
        positions = sample_position_pairs(
            tokens.shape[0], grid_shape, self.pairs, self._generator_on(tokens.device)
        )
        value = drloc_loss(tokens, grid_shape, self.module, positions)
        self._value = value.detach()
        return self.weight * value

    def stats(self) -> dict[str, float | Tensor]:
        return {} if self._value is None else {"drloc": self._value}

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "generator", "device_type"}``: the sampling stream (``generator`` is
        ``None`` before the first draw). The MLP's weights are in :attr:`module`."""
        if self._pending_state is not None:
            return dict(self._pending_state)
        if self._generator is None:
            return {"seed": self.seed, "generator": None, "device_type": None}
        return {
            "seed": self.seed,
            "generator": self._generator.get_state(),
            "device_type": self._generator.device.type,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; applied at the next draw, when the device is known.

        Raises:
            ValueError: missing keys (at once) or, at the next draw, a state saved on another
                device type.
        """
        missing = {"seed", "generator", "device_type"} - set(state)
        if missing:
            raise ValueError(f"DRLoc state lacks the keys {sorted(missing)}")
        self.seed = int(state["seed"])
        self._generator = None
        self._pending_state = dict(state)

    def remove(self) -> None:
        """Detach the hooks; :attr:`module` stays."""
        if self._grid is not None:
            self._grid.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
