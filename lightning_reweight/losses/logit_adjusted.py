"""Logit-adjusted cross-entropy (Menon, Jayasumana, Rawat, Jain, Veit, Kumar; ICLR 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor
from torch.nn import functional as F

from lightning_reweight.functional.longtail import logit_adjustment_offsets
from lightning_reweight.losses._counts import ClassCountLoss

__all__ = ["LogitAdjustedLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class LogitAdjustedLoss(ClassCountLoss):
    """Cross-entropy on ``z + tau * log(pi)``, with ``pi`` the training class prior.

    Adding the log prior during training only (predict with the raw logits ``z``) makes the loss consistent
    for the balanced error at ``tau = 1``; it is the same loss as Balanced Softmax. The offsets are a buffer.
    The loss is computed in float32 whatever the logits' dtype.

    With ``cls_num_list=None`` (e.g. in a config file) the offsets are built once the counts are given:
    :class:`~lightning_reweight.classifier.ReweightClassifier` takes them from
    ``trainer.datamodule.train_class_counts`` when training starts, or call :meth:`set_class_counts`.

    Args:
        cls_num_list: training count of every class; ``None``: given later (see above).
        tau: temperature of the adjustment (0 gives plain cross-entropy).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, for the reweighting contract).

    Example:
        >>> import torch
        >>> loss = LogitAdjustedLoss([3, 1], tau=1.0)
        >>> round(float(loss(torch.zeros(1, 2), torch.tensor([1]))), 4)  # -log(0.25)
        1.3863
    """

    count_buffers = ("offsets",)
    offsets: Tensor

    def __init__(
        self,
        cls_num_list: Sequence[int] | None = None,
        tau: float = 1.0,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number, got {tau}")
        self.tau = float(tau)
        self.reduction = reduction
        self._init_counts(cls_num_list)

    def _count_buffers(self, counts: Tensor) -> dict[str, Tensor]:
        return {"offsets": logit_adjustment_offsets(counts, self.tau)}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The adjusted cross-entropy of ``logits`` (shape ``(B, C)``) against ``target`` (shape ``(B,)``)."""
        self._require_counts()
        if logits.dim() != 2 or logits.shape[1] != self.offsets.numel():
            raise ValueError(f"logits must have shape (B, {self.offsets.numel()}), got {tuple(logits.shape)}")
        return F.cross_entropy(logits.float() + self.offsets.to(logits.device), target, reduction=self.reduction)

    def extra_repr(self) -> str:
        classes = None if self._buffers.get("offsets") is None else self.offsets.numel()
        return f"num_classes={classes}, tau={self.tau}, reduction={self.reduction!r}"
