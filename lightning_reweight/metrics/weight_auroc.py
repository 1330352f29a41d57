"""How well sample weights separate clean from noisy samples: AUROC of the weight against the noise mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from lightning_reweight.metrics._float64 import Float64Metric

__all__ = ["WeightNoiseAUROC", "rank_auroc"]


def rank_auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """AUROC of ``scores`` for the binary labels ``positive`` (Mann-Whitney rank formula, ties count one half).

    Returns ``nan`` when either class is empty or any score is ``nan`` (a ranking with ``nan`` in it is undefined).

    Example:
        >>> import torch
        >>> rank_auroc(torch.tensor([0.9, 0.8, 0.1, 0.8]), torch.tensor([True, True, False, False]))
        tensor(0.8750, dtype=torch.float64)
    """
    s = scores.detach().reshape(-1).double()
    pos = positive.detach().reshape(-1).bool()
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    _, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts.double() - 1.0) / 2.0)[inverse]  # 1-based average ranks
    auroc = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return torch.where(s.isnan().any(), torch.full_like(auroc, float("nan")), auroc)  # no host sync


class WeightNoiseAUROC(Float64Metric):
    """AUROC of per-sample weights against the noise mask (higher weight = clean).

    The probability that a clean sample gets a higher weight than a noisy one (1 = perfect separation,
    0.5 = chance, ties count one half).

    Weights are kept in float64 (float32 would tie distinct float64 weights); a ``nan`` weight makes the result
    ``nan``, as does a call to :meth:`compute` before any :meth:`update`.

    States are concatenated across processes (``dist_reduce_fx="cat"``), so the value under DDP equals the value
    on all samples gathered in one process, ranks that saw no sample included (both states are float64, the dtype
    torchmetrics gives such a rank's empty placeholder).

    Example:
        >>> import torch
        >>> metric = WeightNoiseAUROC()
        >>> metric.update(torch.tensor([1.5, 0.1, 1.2, 0.0]), torch.tensor([False, True, False, True]))
        >>> float(metric.compute())
        1.0
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # the add_state states: lists of batches (while compute() runs after a DDP sync, each is one tensor)
    weights: list[Tensor]
    noisy: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("weights", default=[], dist_reduce_fx="cat")
        self.add_state("noisy", default=[], dist_reduce_fx="cat")  # 1.0 = noisy, float64 like the weights

    def update(self, weights: Tensor, noisy: Tensor) -> None:
        """Add a batch: ``weights`` (B,) and ``noisy`` (B,) booleans (True = the label is corrupted)."""
        if weights.shape != noisy.shape:
            raise ValueError(f"weights {tuple(weights.shape)} and noisy {tuple(noisy.shape)} must have one shape")
        self.weights.append(weights.detach().reshape(-1).double())
        self.noisy.append(noisy.detach().reshape(-1).bool().double())

    def compute(self) -> Tensor:
        """The AUROC (``nan`` when only clean or only noisy samples, or none, were seen)."""
        if isinstance(self.weights, list) and not self.weights:  # nothing seen (after a DDP sync: a tensor)
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return rank_auroc(dim_zero_cat(self.weights), dim_zero_cat(self.noisy) == 0)
