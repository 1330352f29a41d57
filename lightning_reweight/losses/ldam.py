"""LDAM: label-distribution-aware margin loss (Cao, Wei, Gaidon, Arechiga, Ma; NeurIPS 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_reweight.functional.longtail import ldam_margins
from lightning_reweight.losses._fp32 import Float32Buffers

__all__ = ["LDAMLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class LDAMLoss(Float32Buffers):
    """Cross-entropy on ``s * (z - Delta_y e_y)``: a per-class margin subtracted from the target logit only.

    ``Delta_j = K / n_j^(1/4)`` with ``K`` such that the rarest class has margin ``max_m``
    (:func:`~lightning_reweight.functional.ldam_margins`). Use it with a normalised (cosine) head, whose logits
    lie in ``[-1, 1]``; ``s`` rescales them.

    Class weights follow :func:`torch.nn.functional.cross_entropy`: ``reduction="mean"`` is the weighted mean
    ``sum(w_y l) / sum(w_y)``, ``"sum"`` is ``sum(w_y l)``, ``"none"`` returns ``w_y l`` per sample. The
    margins and the class weights are buffers (``.to(device)`` moves them; checkpoints keep them). With
    ``weight=None`` the weight buffer holds ones, so a callback (e.g.
    :class:`~lightning_reweight.callbacks.DeferredReweighting` in ``mode="criterion"``) can fill it in later.
    The loss is computed in float32 whatever the logits' dtype (bf16/fp16 logits times ``s = 30`` lose
    precision).

    Args:
        cls_num_list: training count of every class.
        max_m: the largest margin (rarest class); 0.5 in the paper's CIFAR runs.
        s: logit scale applied after the margin.
        weight: optional class weights, shape ``(C,)``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, for the reweighting contract).

    Example:
        >>> import torch
        >>> loss = LDAMLoss([100, 10, 1], max_m=0.5, s=30.0, reduction="none")
        >>> loss(torch.zeros(2, 3), torch.tensor([0, 2])).shape
        torch.Size([2])
        >>> loss.margins
        tensor([0.1581, 0.2812, 0.5000])
    """

    margins: Tensor
    weight: Tensor

    def __init__(
        self,
        cls_num_list: Sequence[int],
        max_m: float = 0.5,
        s: float = 30.0,
        weight: Sequence[float] | Tensor | None = None,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"s must be positive, got {s}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        margins = ldam_margins(cls_num_list, max_m)
        #: the class counts the margins were built from (``ReweightClassifier`` checks them against the data's)
        self.cls_num_list: tuple[int, ...] = tuple(int(n) for n in torch.as_tensor(cls_num_list).tolist())
        if weight is None:
            w = torch.ones_like(margins)
        else:
            w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
            if w.shape != margins.shape:
                raise ValueError(f"weight must have shape {tuple(margins.shape)} (one per class), got {tuple(w.shape)}")
            if bool((w < 0).any()):
                raise ValueError("weight must be non-negative")
        self.max_m = float(max_m)
        self.s = float(s)
        self.reduction = reduction
        self.register_buffer("margins", margins)
        self.register_buffer("weight", w)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.margins.numel()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The LDAM loss of ``logits`` (shape ``(B, C)``) against integer ``target`` (shape ``(B,)``)."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        z = logits.float()
        margin = self.margins.to(z.device)[target]
        z = z.scatter_add(1, target.unsqueeze(1), -margin.unsqueeze(1))
        return F.cross_entropy(self.s * z, target, weight=self.weight.float(), reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, reduction={self.reduction!r}"
