"""Class-count maths for long-tailed training: LDAM margins, class-balanced weights, logit-adjustment offsets.

All functions take the training count of every class (``cls_num_list``, class ``j`` at position ``j``) and
return float32 tensors of shape ``(C,)``. The maths runs in float64 so that ``beta ** n`` stays exact for large
counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_class_counts",
    "class_balanced_sample_weights",
    "class_balanced_weights",
    "ldam_margins",
    "logit_adjustment_offsets",
]

ClassCounts = Sequence[int] | Sequence[float] | Tensor


def check_class_counts(cls_num_list: ClassCounts, name: str = "cls_num_list") -> Tensor:
    """Validate per-class training counts and return them as a float64 tensor.

    Args:
        cls_num_list: the number of training samples of every class.
        name: the argument name used in error messages.

    Returns:
        The counts, float64, shape ``(C,)``.

    Raises:
        ValueError: when the counts are empty, not one-dimensional, or a class has zero or fewer samples.

    Example:
        >>> check_class_counts([10, 5]).tolist()
        [10.0, 5.0]
    """
    counts = torch.as_tensor(cls_num_list, dtype=torch.float64).detach().cpu()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list of class counts, got shape {tuple(counts.shape)}")
    bad = (counts <= 0) | ~torch.isfinite(counts)
    if bool(bad.any()):
        classes = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"{name} must hold a positive training count for every class; class(es) {classes} have "
            f"{counts[bad].tolist()}. Drop classes without training samples or fix the counts."
        )
    return counts


def ldam_margins(cls_num_list: ClassCounts, max_m: float = 0.5) -> Tensor:
    """LDAM margins ``Delta_j = K / n_j^(1/4)``, with ``K`` such that the largest margin equals ``max_m``.

    Args:
        cls_num_list: training count of every class.
        max_m: the margin of the rarest class (0.5 on CIFAR in Cao et al. 2019).

    Returns:
        Margins, float32, shape ``(C,)``.

    Example:
        >>> ldam_margins([10000, 625, 16], max_m=0.5)  # n^(1/4) = 10, 5, 2
        tensor([0.1000, 0.2000, 0.5000])
    """
    if not (max_m > 0 and math.isfinite(max_m)):
        raise ValueError(f"max_m must be a positive number, got {max_m}")
    counts = check_class_counts(cls_num_list)
    margins = counts.pow(-0.25)
    return (margins * (max_m / margins.max())).float()


def class_balanced_weights(cls_num_list: ClassCounts, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights (Cui et al. 2019): ``(1 - beta) / (1 - beta^n_j)``, normalised to sum to ``C``.

    ``(1 - beta^n) / (1 - beta)`` is the effective number of samples of a class; the weight is its inverse.
    ``beta = 0`` gives ones; ``beta -> 1`` approaches inverse class frequency.

    Args:
        cls_num_list: training count of every class.
        beta: in ``[0, 1)``.

    Returns:
        Weights, float32, shape ``(C,)``, summing to ``C``.

    Example:
        >>> class_balanced_weights([100, 10], beta=0.0)
        tensor([1., 1.])
        >>> class_balanced_weights([100, 1], beta=0.9)  # raw weights ~0.1 and 1.0, rescaled to sum to 2
        tensor([0.1818, 1.8182])
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = check_class_counts(cls_num_list)
    # 1 - beta**n computed as -expm1(n * log(beta)) for accuracy when beta is close to 1
    effective = -torch.expm1(counts * torch.log(torch.tensor(beta, dtype=torch.float64))) if beta > 0 else None
    weights = torch.ones_like(counts) if effective is None else (1.0 - beta) / effective
    return (weights * (counts.numel() / weights.sum())).float()


def logit_adjustment_offsets(cls_num_list: ClassCounts, tau: float = 1.0) -> Tensor:
    """Logit-adjustment offsets ``tau * log(pi_j)`` with the class prior ``pi_j = n_j / sum(n)`` (Menon et al.).

    Args:
        cls_num_list: training count of every class.
        tau: the temperature (1 gives the Bayes-consistent balanced loss).

    Returns:
        Offsets, float32, shape ``(C,)`` (all non-positive for ``tau >= 0``).

    Example:
        >>> logit_adjustment_offsets([3, 1], tau=1.0).exp()
        tensor([0.7500, 0.2500])
    """
    counts = check_class_counts(cls_num_list)
    return (tau * torch.log(counts / counts.sum())).float()


def class_balanced_sample_weights(targets: Tensor, cls_num_list: ClassCounts, beta: float = 0.9999) -> Tensor:
    """Per-sample sampling weights for class-balanced resampling: sample ``i`` gets ``w_{y_i}``.

    ``w`` is :func:`class_balanced_weights`. Class ``j`` is then drawn with probability proportional to
    ``n_j * w_j = n_j (1 - beta) / (1 - beta^n_j)``: uniform over classes as ``beta -> 1``, the natural
    (instance-balanced) frequencies at ``beta = 0``.

    Args:
        targets: the label of every training sample, shape ``(N,)``.
        cls_num_list: training count of every class.
        beta: in ``[0, 1)``.

    Returns:
        Non-negative float64 weights, shape ``(N,)`` (for ``torch.multinomial``).

    Example:
        >>> w = class_balanced_sample_weights(torch.tensor([0, 0, 0, 1]), [3, 1], beta=0.9999)
        >>> round(float(w[:3].sum() / w.sum()), 3)  # class 0 gets about half of the draws
        0.5
    """
    targets = torch.as_tensor(targets).long().cpu()
    weights = class_balanced_weights(cls_num_list, beta).double()
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weights.numel()):
        raise ValueError(f"targets must lie in [0, {weights.numel() - 1}] (one count per class in cls_num_list)")
    return weights[targets]
