"""Learning to Reweight (Ren et al., 2018): weights from the alignment with the clean meta gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_reweight.contract import mean_scale
from lightning_reweight.meta.base import MetaStrategy
from lightning_reweight.meta.engine import MetaProblem

__all__ = ["L2RW", "l2rw_from_alignment"]


def l2rw_from_alignment(alignment: Tensor) -> Tensor:
    """``w_i = max(u_i, 0) / sum_j max(u_j, 0)``; all zero when no sample aligns (no division by zero).

    Computed in the alignment's dtype (at least float32), so that tiny or float64 alignments still sum to one.
    A ``nan`` alignment (a ``nan`` input or loss) makes every weight ``nan`` rather than all zero, which would
    look like "no sample aligns".

    Example:
        >>> l2rw_from_alignment(torch.tensor([3.0, -1.0, 1.0]))
        tensor([0.7500, 0.0000, 0.2500])
        >>> l2rw_from_alignment(torch.tensor([-1.0, 0.0]))
        tensor([0., 0.])
    """
    u = alignment.detach()
    w = u.to(torch.promote_types(u.dtype, torch.float32)).clamp_min(0.0)  # float64 alignments stay float64
    total = w.sum()
    usable = total > 0
    # divide by the total itself, however small (a subnormal total still normalises); 1 where it is 0
    out = w / torch.where(usable, total, torch.ones_like(total))
    return torch.where(usable, out, torch.where(total.isnan(), total, torch.zeros_like(w)))


class L2RW(MetaStrategy):
    """Learning to Reweight: ``w_i`` proportional to ``max(<grad l_i(theta), grad L_meta(theta)>, 0)``.

    The virtual step of the paper has ``eps = 0``, so ``theta' = theta`` and ``-dL_meta/d eps_i`` is ``lr`` times
    the alignment; the step size only scales the weights before normalisation. Returned on the mean scale
    (``B * w``); when no sample aligns the weights are all zero, and so is the loss (the step only applies
    weight decay and momentum). Stateless: every step is a meta step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_reweight.meta.engine import MetaProblem
        >>> net = nn.Linear(3, 2)
        >>> ce = lambda b: nn.functional.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        >>> w = L2RW().meta_weights(MetaProblem(net, ce, lambda b: ce(b).mean(), batch, batch), lr=0.1)
        >>> bool(torch.isclose(w.sum(), torch.tensor(4.0)) or w.sum() == 0)
        True
    """

    stateful = False
    early_alignment = True

    def meta_weights(self, problem: MetaProblem, lr: float) -> Tensor:
        """Mean-scale L2RW weights of the problem's training batch."""
        return mean_scale(l2rw_from_alignment(problem.alignment()))
