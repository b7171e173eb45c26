"""Auxiliary losses the engine adds to the task loss, behind one small interface."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from spatial_entropy.attention import AttentionCapture
from spatial_entropy.entropy import SpatialEntropyLoss, se_weight

__all__ = ["Regularizer", "SpatialEntropyRegularizer"]


@runtime_checkable
class Regularizer(Protocol):
    """An auxiliary loss computed from what the model did in its latest forward pass.

    The engine calls ``attach(model)`` once, ``set_progress(t, total)`` before each step,
    and after each forward ``reg()``, which returns the *weighted* term to add to the task loss.
    ``stats()`` gives the values of the latest call for logging (floats or 0-dim tensors,
    so that logging need not synchronise the device every step).
    """

    name: str

    def attach(self, model: nn.Module) -> None: ...

    def set_progress(self, t: float, total: float) -> None: ...

    def __call__(self) -> Tensor: ...

    def stats(self) -> dict[str, float | Tensor]: ...

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

    def remove(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
