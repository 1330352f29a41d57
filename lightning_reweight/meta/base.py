"""What a meta-reweighting strategy is: a rule turning one :class:`MetaProblem` into per-sample weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_reweight.meta.engine import MetaProblem

__all__ = ["MetaStrategy"]


class MetaStrategy(nn.Module):
    """Base class of meta-gradient weighting strategies (L2RW, Meta-Weight-Net, ...).

    A strategy is an ``nn.Module`` so that its learned state (a meta-network) follows ``.to(device)``; it is
    owned by :class:`~lightning_reweight.callbacks.MetaReweight`, never registered in the user's model (whose
    optimizer must not see it).

    Subclasses implement :meth:`meta_weights` (a meta step: update any learned state, return weights) and, if
    they have learned state, :meth:`weights` (weights between meta steps) and :meth:`extra_state`.

    Example:
        >>> import torch
        >>> class Uniform(MetaStrategy):
        ...     def meta_weights(self, problem, lr):
        ...         return torch.ones_like(problem.detached_losses())
        >>> Uniform().stateful
        False
    """

    #: whether the strategy keeps learned state between steps (then ``meta_interval > 1`` makes sense)
    stateful: bool = False
    #: whether :meth:`meta_weights` needs from the problem only :meth:`MetaProblem.alignment` (L2RW's ``u`` at
    #: ``theta``), which :class:`~lightning_reweight.callbacks.MetaReweight` then prepares before the training
    #: forward (:meth:`MetaProblem.prepare`)
    early_alignment: bool = False
    #: whether the meta step runs after the real backward pass (:meth:`meta_update` with the real step's
    #: gradient), the real step weighting with :meth:`weights` of the state before it
    delayed: bool = False

    def meta_weights(self, problem: MetaProblem, lr: float) -> Tensor:
        """One meta step on ``problem`` with virtual-step size ``lr``; returns mean-scale weights ``(B,)``."""
        raise NotImplementedError

    def weights(self, losses: Tensor) -> Tensor:
        """Mean-scale weights between meta steps (only stateful strategies have any)."""
        raise NotImplementedError(f"{type(self).__name__} has no weights between meta steps; use meta_interval=1")

    def meta_update(self, problem: MetaProblem, lr: float, step_gradient: Sequence[Tensor | None]) -> None:
        """A delayed meta step: update the learned state, given the real step's gradient ``grad sum w_i l_i``.

        Only strategies with ``delayed = True`` implement it.
        """
        raise NotImplementedError(f"{type(self).__name__} has no delayed meta step")

    def extra_state(self) -> dict[str, Any]:
        """State beyond ``state_dict()`` to checkpoint (e.g. a meta-optimizer's)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
