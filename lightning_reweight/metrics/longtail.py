"""Long-tail accuracy metrics: per-class accuracy, balanced accuracy, many/medium/few-shot accuracy.

All three keep two ``(C,)`` count states (correct predictions and samples per true class) with
``dist_reduce_fx="sum"``, so their values under DDP equal those of one process that saw all the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_reweight.functional.longtail import check_class_counts

__all__ = ["BalancedAccuracy", "PerClassAccuracy", "ShotAccuracy"]


class _ClassCounts(Metric):
    """Correct predictions and samples per true class."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count a batch: ``preds`` are labels ``(B,)`` or scores ``(B, C)`` (argmax taken); ``target`` ``(B,)``."""
        if target.dim() != 1:
            raise ValueError(f"target must be labels of shape (B,), got {tuple(target.shape)}")
        if target.is_floating_point():
            raise ValueError("target must be integer class labels, got floating point")
        if preds.dim() == 2:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"2-D preds are scores of shape (B, num_classes={self.num_classes}), got {tuple(preds.shape)}; "
                    "pass predicted labels as shape (B,)"
                )
            preds = preds.argmax(dim=1)
        elif preds.is_floating_point():
            raise ValueError(
                "1-D preds must be integer class labels, got floating point (probabilities?); pass labels, or scores "
                f"of shape (B, num_classes={self.num_classes})"
            )
        if preds.shape != target.shape:
            raise ValueError(f"preds and target must match, got {tuple(preds.shape)} and {tuple(target.shape)}")
        target = target.long()
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"target must lie in [0, {self.num_classes - 1}]")
        hit = (preds.long() == target).long()
        # out of place: after a trainer.validate/test (inference mode) the reset states are inference tensors, which
        # a later fit's validation (grad mode) may not update in place
        self.correct = self.correct + torch.zeros_like(self.correct).scatter_add_(0, target, hit)
        self.total = self.total + torch.bincount(target, minlength=self.num_classes)

    def _per_class(self) -> Tensor:
        """Per-class accuracy; NaN for classes without samples."""
        total = self.total.double()
        acc = self.correct.double() / total.clamp_min(1)
        return torch.where(total > 0, acc, torch.full_like(acc, float("nan"))).float()


class PerClassAccuracy(_ClassCounts):
    """Accuracy of every class (recall per true class), shape ``(C,)``; NaN for a class with no samples.

    Args:
        num_classes: number of classes.

    Example:
        >>> import torch
        >>> m = PerClassAccuracy(3)
        >>> m.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
        >>> m.compute()
        tensor([1.0000, 0.3333,    nan])
    """

    def compute(self) -> Tensor:
        return self._per_class()


class BalancedAccuracy(_ClassCounts):
    """Balanced accuracy: the mean of the per-class accuracies over the classes that have samples.

    Args:
        num_classes: number of classes.

    Example:
        >>> import torch
        >>> m = BalancedAccuracy(3)
        >>> m.update(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]))
        >>> round(float(m.compute()), 4)  # (1 + 1/3) / 2
        0.6667
    """

    def compute(self) -> Tensor:
        return self._per_class().nanmean()


class ShotAccuracy(_ClassCounts):
    """Many-, medium- and few-shot accuracy: the mean per-class accuracy within each group of classes.

    A class is *many-shot* when it has more than ``many_threshold`` training samples, *few-shot* when it has
    fewer than ``few_threshold``, *medium-shot* otherwise (defaults: >100 / 20-100 / <20, as in the long-tail
    literature). Groups without classes (or without evaluated samples) give NaN.

    Args:
        cls_num_list: training count of every class (defines the groups and the number of classes).
        many_threshold: a class with more training samples than this is many-shot.
        few_threshold: a class with fewer training samples than this is few-shot.

    Example:
        >>> import torch
        >>> m = ShotAccuracy([500, 50, 5])
        >>> m.update(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 1, 2, 2]))
        >>> {k: float(v) for k, v in m.compute().items()}
        {'many': 1.0, 'medium': 1.0, 'few': 0.0}
    """

    groups: Tensor

    def __init__(
        self, cls_num_list: Sequence[int], many_threshold: int = 100, few_threshold: int = 20, **kwargs: object
    ) -> None:
        counts = check_class_counts(cls_num_list)
        if few_threshold > many_threshold:
            raise ValueError(f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})")
        super().__init__(counts.numel(), **kwargs)
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        group = torch.ones(counts.numel(), dtype=torch.long)  # 0 many, 1 medium, 2 few
        group[counts > many_threshold] = 0
        group[counts < few_threshold] = 2
        self.register_buffer("groups", group, persistent=False)

    def compute(self) -> dict[str, Tensor]:
        acc = self._per_class()
        nan = torch.tensor(float("nan"), device=acc.device)
        return {
            name: acc[self.groups == g].nanmean() if bool((self.groups == g).any()) else nan
            for g, name in enumerate(("many", "medium", "few"))
        }
