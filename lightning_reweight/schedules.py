"""Learning-rate schedules of the long-tailed recipes: linear warm-up, then step decay (per epoch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_multistep", "warmup_multistep_factor"]


def warmup_multistep_factor(
    warmup_epochs: int = 5, milestones: Sequence[int] = (160, 180), gamma: float = 0.01
) -> Callable[[int], float]:
    """The lr multiplier of epoch ``e`` (0-based): linear warm-up, then ``gamma`` per milestone passed.

    ``factor(e) = (e + 1) / warmup_epochs`` for ``e < warmup_epochs``, else ``gamma ** #{m in milestones: m <= e}``.
    With the defaults (the LDAM-DRW CIFAR recipe): 0.2, 0.4, ..., 1.0 over epochs 0-4, 1.0 until epoch 159,
    0.01 from 160 and 0.0001 from 180.

    Args:
        warmup_epochs: epochs of linear warm-up (0 disables it).
        milestones: epochs at which the lr is multiplied by ``gamma``.
        gamma: the decay factor.

    Returns:
        A function of the epoch, for :class:`torch.optim.lr_scheduler.LambdaLR`.

    Example:
        >>> f = warmup_multistep_factor(5, (160, 180), 0.01)
        >>> [f(0), f(4), f(159), f(160), f(180)]
        [0.2, 1.0, 1.0, 0.01, 0.0001]
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    steps = sorted(int(m) for m in milestones)

    def factor(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / warmup_epochs
        return gamma ** sum(1 for m in steps if m <= epoch)

    return factor


def warmup_multistep(
    optimizer: Optimizer, warmup_epochs: int = 5, milestones: Sequence[int] = (160, 180), gamma: float = 0.01
) -> LambdaLR:
    """A per-epoch :class:`~torch.optim.lr_scheduler.LambdaLR` with :func:`warmup_multistep_factor`.

    Step it once per epoch (Lightning: ``{"scheduler": sched, "interval": "epoch"}``). The lr of epoch ``e``
    is ``base_lr * factor(e)``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> sched = warmup_multistep(opt, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
        >>> round(opt.param_groups[0]["lr"], 4)  # epoch 0
        0.02
    """
    return LambdaLR(optimizer, warmup_multistep_factor(warmup_epochs, milestones, gamma))
