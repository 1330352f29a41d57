"""Per-sample weight history: how each training sample fared against its batch-mates over all its visits.

One epoch's weights separate clean from noisy samples only as well as one meta step can (for Learning to Reweight
the sign of a single, noisy alignment; the per-epoch AUROC of :class:`WeightNoiseAUROC`). A sample is seen once
per epoch, though, and averaging its standing over many epochs turns a weak per-step signal into a strong
per-sample one: a score to rank suspected mislabelled samples by, no clean labels needed.

For every visit of sample ``i`` the metric adds its weight, whether the weight is positive, and its within-batch
*percentile*: ``(r - 1/2) / B`` with ``r`` its 1-based rank among the ``B`` weights of its batch (ties share their
mean rank), so uniform weights give every sample 0.5 whatever the batch's weight scale or normalisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_reweight.metrics._float64 import Float64Metric

__all__ = ["SampleWeightHistory", "batch_percentiles"]

_COLUMNS = ("visits", "percentile", "mean_weight", "positive_share")  # the per-sample sums, column by column


def batch_percentiles(weights: Tensor) -> Tensor:
    """Each weight's mid-rank percentile within its batch, ``(rank - 1/2) / B`` in ``(0, 1)`` (float64).

    A batch with a ``nan`` weight has no ranking: every percentile of it is ``nan``.

    Example:
        >>> import torch
        >>> batch_percentiles(torch.tensor([0.0, 0.5, 0.0, 2.0]))
        tensor([0.2500, 0.6250, 0.2500, 0.8750], dtype=torch.float64)
    """
    w = weights.detach().reshape(-1)
    ordered = w.sort().values
    below = torch.searchsorted(ordered, w, right=False)  # weights strictly below
    up_to = torch.searchsorted(ordered, w, right=True)  # weights below or tied, itself included
    percentiles = (below + up_to).double() / (2 * max(w.numel(), 1))  # (below + tied / 2) / B
    return torch.where(w.isnan().any(), torch.full_like(percentiles, float("nan")), percentiles)  # no host sync


class SampleWeightHistory(Float64Metric):
    """Accumulate, per training sample (by dataset index), its weights over every batch it appeared in.

    ``compute()`` returns a dict of per-sample tensors of length ``num_samples`` (``nan`` for samples never seen):

    - ``"percentile"``: the mean within-batch percentile of its weights (0.5 = average; the score to rank suspected
      noisy samples by, low = suspect; works for any weighting method);
    - ``"mean_weight"``: the mean of its weights;
    - ``"positive_share"``: the share of its visits with a weight above zero (for methods that clip weights at
      zero, such as Learning to Reweight);
    - ``"visits"``: how many times it was weighted (0 for never).

    A ``nan`` weight (a diverged run) is not ranked: it makes the sample's ``mean_weight`` and ``positive_share``
    ``nan``, and the ``percentile`` of every sample in its batch, so that it shows instead of passing for a score.

    All states are per-sample sums (``dist_reduce_fx="sum"``), so under DDP the result equals that of one process
    seeing every rank's batches (each rank's percentiles are taken within its own batch, the batch its weights
    were normalised over).

    Args:
        num_samples: the training set's length; indices must lie in ``[0, num_samples)``.

    Example:
        >>> import torch
        >>> history = SampleWeightHistory(num_samples=4)
        >>> history.update(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
        >>> history.update(torch.tensor([0.6, 0.2]), torch.tensor([0, 2]))
        >>> history.compute()["percentile"]
        tensor([0.7500, 0.2500, 0.2500,    nan], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    sums: Tensor  # the add_state state, (num_samples, len(_COLUMNS))

    def __init__(self, num_samples: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        sums = torch.zeros(self.num_samples, len(_COLUMNS), dtype=torch.float64)
        self.add_state("sums", default=sums, dist_reduce_fx="sum")

    def update(self, weights: Tensor, indices: Tensor) -> None:
        """Add one batch: ``weights`` (B,) and the samples' dataset ``indices`` (B,)."""
        if indices.is_floating_point():
            raise ValueError("indices must be integer dataset indices, got floating point")
        w = weights.detach().reshape(-1).double()
        idx = indices.detach().reshape(-1).long().to(self.sums.device)
        if w.numel() != idx.numel():
            raise ValueError(f"weights ({w.numel()}) and indices ({idx.numel()}) must have one length")
        if idx.numel() == 0:
            return
        checked, self._checked_once = getattr(self, "_checked_once", False), True
        # on CPU every batch; on a GPU the first (a host sync; an out-of-range index there would be a device-side
        # assert that kills the CUDA context instead of this error)
        if (idx.device.type == "cpu" or not checked) and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise ValueError(
                f"indices must lie in [0, {self.num_samples}) (num_samples = the training set's length), got "
                f"[{int(idx.min())}, {int(idx.max())}]"
            )
        w = w.to(self.sums.device)
        positive = torch.where(w.isnan(), w, (w > 0).double())  # a nan weight is neither positive nor not
        rows = torch.stack([torch.ones_like(w), batch_percentiles(w), w, positive], dim=1)
        self.sums.index_add_(0, idx, rows)

    def metric_state_cpu(self) -> dict[str, Tensor]:
        """The accumulated sums as CPU tensors (this process's own, not synced), for a checkpoint."""
        return {"sums": self.sums.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> SampleWeightHistory:
        """A history holding the sums of :meth:`metric_state_cpu` (on CPU; move it with ``.to(device)``)."""
        history = cls(num_samples=int(state["sums"].shape[0]))
        history.sums.copy_(state["sums"])
        history._update_count = 1  # holds updates: torchmetrics would warn that compute() comes before update()
        return history

    def compute(self) -> dict[str, Tensor]:
        """Per-sample means over the visits (``nan`` where ``visits`` is 0) and the visit counts."""
        visits = self.sums[:, 0]
        means = self.sums[:, 1:] / torch.where(visits > 0, visits, torch.full_like(visits, float("nan")))[:, None]
        return {"visits": visits.clone(), **{name: means[:, k] for k, name in enumerate(_COLUMNS[1:])}}
