"""Logit-adjusted cross-entropy (Menon, Jayasumana, Rawat, Jain, Veit, Kumar; ICLR 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_reweight.functional.longtail import logit_adjustment_offsets
from lightning_reweight.losses._fp32 import Float32Buffers

__all__ = ["LogitAdjustedLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class LogitAdjustedLoss(Float32Buffers):
    """Cross-entropy on ``z + tau * log(pi)``, with ``pi`` the training class prior.

    Adding the log prior during training only (predict with the raw logits ``z``) makes the loss consistent
    for the balanced error at ``tau = 1``; it is the same loss as Balanced Softmax. The offsets are a buffer.
    The loss is computed in float32 whatever the logits' dtype.

    Args:
        cls_num_list: training count of every class.
        tau: temperature of the adjustment (0 gives plain cross-entropy).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, for the reweighting contract).

    Example:
        >>> import torch
        >>> loss = LogitAdjustedLoss([3, 1], tau=1.0)
        >>> round(float(loss(torch.zeros(1, 2), torch.tensor([1]))), 4)  # -log(0.25)
        1.3863
    """

    offsets: Tensor

    def __init__(
        self, cls_num_list: Sequence[int], tau: float = 1.0, reduction: Literal["mean", "sum", "none"] = "mean"
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.tau = float(tau)
        self.reduction = reduction
        self.register_buffer("offsets", logit_adjustment_offsets(cls_num_list, tau))
        #: the class counts the offsets were built from (``ReweightClassifier`` checks them against the data's)
        self.cls_num_list: tuple[int, ...] = tuple(int(n) for n in torch.as_tensor(cls_num_list).tolist())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The adjusted cross-entropy of ``logits`` (shape ``(B, C)``) against ``target`` (shape ``(B,)``)."""
        if logits.dim() != 2 or logits.shape[1] != self.offsets.numel():
            raise ValueError(f"logits must have shape (B, {self.offsets.numel()}), got {tuple(logits.shape)}")
        return F.cross_entropy(logits.float() + self.offsets.to(logits.device), target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.offsets.numel()}, tau={self.tau}, reduction={self.reduction!r}"
