"""LDAM: label-distribution-aware margin loss (Cao, Wei, Gaidon, Arechiga, Ma; NeurIPS 2019)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_reweight.functional.longtail import ldam_margins
from lightning_reweight.losses._counts import ClassCountLoss

__all__ = ["LDAMLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class LDAMLoss(ClassCountLoss):
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

    With ``cls_num_list=None`` (e.g. in a config file, where the counts of the data are not known yet) the margins
    are built once the counts are given: :class:`~lightning_reweight.classifier.ReweightClassifier` takes them from
    ``trainer.datamodule.train_class_counts`` when training starts, or call :meth:`set_class_counts`.

    Args:
        cls_num_list: training count of every class; ``None``: given later (see above).
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
        >>> later = LDAMLoss(reduction="none")  # counts to come (ReweightClassifier: from the datamodule)
        >>> later.set_class_counts([100, 10, 1])
        >>> bool(torch.equal(later.margins, loss.margins))
        True
    """

    count_buffers = ("margins", "weight")
    margins: Tensor
    weight: Tensor

    def __init__(
        self,
        cls_num_list: Sequence[int] | None = None,
        max_m: float = 0.5,
        s: float = 30.0,
        weight: Sequence[float] | Tensor | None = None,
        reduction: Literal["mean", "sum", "none"] = "mean",
    ) -> None:
        super().__init__()
        if not (s > 0 and math.isfinite(s)):
            raise ValueError(f"s must be a positive number, got {s}")
        if not (max_m > 0 and math.isfinite(max_m)):
            raise ValueError(f"max_m must be a positive number, got {max_m}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.max_m = float(max_m)
        self.s = float(s)
        self.reduction = reduction
        self._given_weight: Tensor | None = None
        if weight is not None:
            w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
            if w.dim() != 1:
                raise ValueError(f"weight must be 1-D (one per class), got shape {tuple(w.shape)}")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError(f"weight must be finite and non-negative, got {w.tolist()}")
            self._given_weight = w
        self._init_counts(cls_num_list)

    def _count_buffers(self, counts: Tensor) -> dict[str, Tensor]:
        margins = ldam_margins(counts, self.max_m)
        if self._given_weight is None:
            return {"margins": margins, "weight": torch.ones_like(margins)}
        if self._given_weight.shape != margins.shape:
            raise ValueError(
                f"weight must have shape {tuple(margins.shape)} (one per class), got {tuple(self._given_weight.shape)}"
            )
        return {"margins": margins, "weight": self._given_weight.clone()}

    @property
    def num_classes(self) -> int | None:
        """Number of classes (``None`` while the counts are not known)."""
        return None if self._buffers.get("margins") is None else self.margins.numel()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """The LDAM loss of ``logits`` (shape ``(B, C)``) against integer ``target`` (shape ``(B,)``)."""
        self._require_counts()
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        if target.dtype != torch.long:  # e.g. uint8 targets: indexing with them would be a boolean mask
            if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
                raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
            target = target.long()
        z = logits.float()
        margin = self.margins.to(z.device)[target]
        z = z.scatter_add(1, target.unsqueeze(1), -margin.unsqueeze(1))
        weight = self.weight.to(z.device, torch.float32)
        return F.cross_entropy(self.s * z, target, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, max_m={self.max_m}, s={self.s}, reduction={self.reduction!r}"
