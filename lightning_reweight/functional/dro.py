"""KL-regularised distributionally robust weights: ``p_i`` proportional to ``exp(l_i / lam)``.

The inner maximisation ``max_p sum_i p_i l_i - lam * KL(p, uniform)`` over the simplex has the closed form
``p = softmax(l / lam)`` and the value ``lam * log mean exp(l / lam)`` (the DRO objective). ``lam > 0`` puts
weight on high-loss samples (class imbalance), ``lam < 0`` on low-loss samples (label noise), and
``|lam| -> infinity`` gives uniform weights (plain ERM). Everything here works in fp32 log space, so no
``exp`` overflows for any finite loss and any ``lam != 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dro_objective", "dro_weights", "log_mean_exp"]

_NORMALIZATIONS = ("sum", "mean")


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if lam == 0.0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite non-zero number (or None for plain ERM), got {lam}")
    return lam


def log_mean_exp(x: Tensor, *, distributed: bool = False) -> Tensor:
    """``log(mean(exp(x)))`` over all entries, in fp32, without overflow.

    Args:
        x: any tensor (detach it first if no gradient is wanted).
        distributed: when ``torch.distributed`` is initialised with more than one process, take the mean
            over the entries of **every** rank (one ``all_gather`` of two numbers per rank; every rank must
            call it). The result is then identical on all ranks, whatever each rank's batch size.

    Returns:
        A scalar fp32 tensor (``-inf`` when there are no entries).

    Example:
        >>> import torch
        >>> float(log_mean_exp(torch.tensor([1000.0, 1000.0])))
        1000.0
    """
    x = x.reshape(-1).float()
    lse = torch.logsumexp(x, dim=0) if x.numel() else x.new_tensor(-math.inf)
    count = x.new_tensor(float(x.numel()))
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            packed = torch.stack([lse, count])
            gathered = [torch.empty_like(packed) for _ in range(world)]
            torch.distributed.all_gather(gathered, packed)
            stacked = torch.stack(gathered)
            lse, count = torch.logsumexp(stacked[:, 0], dim=0), stacked[:, 1].sum()
    return torch.where(count > 0, lse - count.clamp_min(1.0).log(), lse.new_tensor(-math.inf))


def dro_weights(losses: Tensor, lam: float | None, *, normalization: str = "sum") -> Tensor:
    """The DRO weights ``softmax(l / lam)``, computed in fp32.

    Args:
        losses: per-sample losses, shape ``(B,)`` (any float dtype; upcast to fp32).
        lam: the temperature. ``> 0`` up-weights high losses, ``< 0`` down-weights them, ``None`` gives
            uniform weights (plain ERM).
        normalization: ``"sum"`` (the weights sum to one: ``softmax(l / lam)``) or ``"mean"`` (the contract's
            mean scale: ``B * softmax(l / lam)``, uniform = ones).

    Returns:
        fp32 weights of shape ``(B,)``, with the autograd graph of ``losses`` (detach if you want constants).

    Example:
        >>> import torch
        >>> dro_weights(torch.tensor([0.0, 0.0]), lam=1.0)
        tensor([0.5000, 0.5000])
        >>> dro_weights(torch.tensor([1.0, 1.0]), lam=None, normalization="mean")
        tensor([1., 1.])
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if losses.dim() != 1:
        raise ValueError(f"losses must be per-sample, of shape (B,), got {tuple(losses.shape)}")
    losses = losses.float()
    if lam is None:
        w = torch.ones_like(losses)
        return w if normalization == "mean" else w / max(losses.numel(), 1)
    w = torch.softmax(losses / _check_lam(lam), dim=0)
    return w * losses.numel() if normalization == "mean" else w


def dro_objective(losses: Tensor, lam: float | None) -> Tensor:
    """The KL-DRO objective ``lam * log mean exp(l / lam)`` (the mean loss when ``lam`` is ``None``).

    It equals ``max_p sum_i p_i l_i - lam * KL(p, uniform)`` and lies between the mean loss and the maximum
    loss for ``lam > 0`` (between the minimum and the mean for ``lam < 0``).

    Args:
        losses: per-sample losses, shape ``(B,)``; computed in fp32.
        lam: the temperature, or ``None`` for the plain mean.

    Returns:
        A scalar fp32 tensor (differentiable in ``losses``).

    Example:
        >>> import torch
        >>> round(float(dro_objective(torch.tensor([1.0, 1.0]), lam=0.1)), 6)
        1.0
    """
    losses = losses.float()
    if lam is None:
        return losses.mean()
    lam = _check_lam(lam)
    return lam * log_mean_exp(losses / lam)
