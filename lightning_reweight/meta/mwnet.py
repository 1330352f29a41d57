"""Meta-Weight-Net (Shu et al., 2019): a small MLP maps each sample's loss to its weight, learned on a meta set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_reweight.contract import mean_scale
from lightning_reweight.meta.base import MetaStrategy
from lightning_reweight.meta.engine import MetaProblem

__all__ = ["MetaWeightNet", "WeightNet"]

_META_OPTIMIZERS = ("adam", "sgd")


class WeightNet(nn.Module):
    """``V(l; phi)``: MLP 1 -> hidden -> 1, ReLU, sigmoid output, applied to the (detached, fp32) loss values.

    Example:
        >>> import torch
        >>> WeightNet(hidden=8)(torch.tensor([0.1, 2.0])).shape
        torch.Size([2])
    """

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, losses: Tensor) -> Tensor:
        """Weights in (0, 1), shape ``(B,)``."""
        p = next(self.parameters())
        return torch.sigmoid(self.net(losses.detach().to(p.dtype).reshape(-1, 1))).reshape(-1)


def _fp32(device: torch.device) -> torch.autocast:
    """Autocast off: the meta-net and its surrogate loss run in fp32 inside a bf16/fp16-mixed training step."""
    return torch.autocast(device_type=device.type, enabled=False)


class MetaWeightNet(MetaStrategy):
    """Meta-Weight-Net: learn ``V(l; phi)`` so that a virtual SGD step on ``mean_i V(l_i) l_i`` lowers the meta loss.

    One meta step (the paper's three stages): the virtual step ``theta'(phi) = theta - a * sum_i w_i grad l_i``
    with ``w = V / B`` (or ``V / sum V`` when ``normalize``), ``a`` the classifier's current lr; a meta-optimizer
    step on ``phi`` against ``grad_phi L_meta(theta'(phi)) = -a * sum_i G_i dw_i/dphi`` with
    ``G_i = <grad l_i(theta), grad L_meta(theta')>``; then the actual weights ``V(l; phi_new)``.

    The identity is exact: ``"forward"`` gives the same meta gradient as ``"second_order"`` (to float
    rounding); ``"finite_diff"`` approximates ``G_i`` by a one-sided difference along ``grad L_meta(theta')``.
    The virtual step is plain SGD (no momentum, no weight decay), as in the official code.

    ``lookahead=False`` is a cheaper, first-order variant (not the paper's): ``G_i`` is taken at ``theta``
    instead of ``theta'`` (``G_i = <grad l_i(theta), grad L_meta(theta)>``, L2RW's alignment), which drops the
    virtual step and its backward pass; the error is first order in ``a`` (it is the meta gradient's limit as
    the virtual step shrinks, times ``a``). Every hypergradient route supports it.

    ``delayed=True`` keeps the paper's meta gradient but reorders the step: the real step weights with
    ``V(l; phi)`` *before* this step's meta update (the update takes effect from the next step), so its gradient
    ``grad sum_i w_i l_i`` is the virtual step's, and :class:`~lightning_reweight.callbacks.MetaReweight` runs the
    meta update after the real backward pass (``on_before_optimizer_step``) with that gradient: one backward pass
    fewer per meta step. The new ``phi`` is the same as without the delay (on the fast routes, single process,
    when the training loss is exactly ``reweight``'s); only the real step's weights are one meta step old.
    ``"second_order"`` still differentiates its own virtual step (the reference).

    Defaults follow the official noisy-label / ResNet-32 script: Adam, lr 1e-3, weight decay 1e-4, hidden 100,
    no weight normalisation (the loss is ``mean_i V(l_i) l_i``).

    Args:
        hidden: hidden width of the weighting MLP.
        meta_lr: meta-optimizer learning rate.
        meta_optimizer: ``"adam"`` or ``"sgd"``.
        meta_weight_decay: meta-optimizer weight decay.
        meta_momentum: SGD momentum (ignored by Adam).
        nesterov: Nesterov momentum for SGD.
        normalize: divide the weights by their sum (the WRN-28-10 / class-imbalance scripts); returned on the
            mean scale.
        lookahead: take ``G_i`` at the virtual-step parameters ``theta'`` (the paper); ``False`` takes it at
            ``theta`` (first order, one backward pass fewer per meta step).
        delayed: run the meta update after the real backward pass and reuse its gradient for the virtual step
            (the real step weights with the meta-net before the update; one backward pass fewer per meta step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_reweight.meta.engine import MetaProblem
        >>> net = nn.Linear(3, 2)
        >>> ce = lambda b: nn.functional.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        >>> mwn = MetaWeightNet(hidden=8)
        >>> w = mwn.meta_weights(MetaProblem(net, ce, lambda b: ce(b).mean(), batch, batch), lr=0.1)
        >>> bool(((w > 0) & (w < 1)).all())
        True
    """

    stateful = True

    def __init__(
        self,
        hidden: int = 100,
        meta_lr: float = 1e-3,
        meta_optimizer: Literal["adam", "sgd"] = "adam",
        meta_weight_decay: float = 1e-4,
        meta_momentum: float = 0.9,
        nesterov: bool = True,
        normalize: bool = False,
        lookahead: bool = True,
        delayed: bool = False,
    ) -> None:
        super().__init__()
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be positive, got {meta_lr}")
        if meta_optimizer not in _META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {_META_OPTIMIZERS}, got {meta_optimizer!r}")
        self.weight_net = WeightNet(hidden)
        self.normalize = normalize
        self.lookahead = lookahead
        self.delayed = delayed
        self.early_alignment = not lookahead and not delayed  # first order: G is L2RW's alignment at theta
        params = list(self.weight_net.parameters())
        if meta_optimizer == "adam":
            self.meta_opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=meta_lr,
                                                                     weight_decay=meta_weight_decay)
        else:
            self.meta_opt = torch.optim.SGD(params, lr=meta_lr, momentum=meta_momentum,
                                            weight_decay=meta_weight_decay, nesterov=nesterov and meta_momentum > 0)

    def _virtual(self, v: Tensor) -> Tensor:
        return v / v.sum().clamp_min(1e-12) if self.normalize else v / v.numel()

    def weights(self, losses: Tensor) -> Tensor:
        """Mean-scale weights ``V(l; phi)`` (``mean_scale`` of them when ``normalize``)."""
        with torch.no_grad(), _fp32(losses.device):
            v = self.weight_net(losses.float())
        return mean_scale(v) if self.normalize else v

    def meta_gradient(
        self, problem: MetaProblem, lr: float, step_gradient: Sequence[Tensor | None] | None = None
    ) -> list[Tensor]:
        """``grad_phi L_meta(theta'(phi))`` by the problem's hypergradient route (this process only).

        ``step_gradient``: ``grad_theta sum_i w_i l_i`` if already computed (by the real backward pass);
        the fast routes then take the virtual step from it instead of differentiating it.
        """
        phi = list(self.weight_net.parameters())
        with torch.enable_grad(), _fp32(phi[0].device):  # the meta-net in fp32 under a caller's autocast too
            if problem.hypergrad == "second_order" and self.lookahead:
                return problem.virtual_step_gradient(lambda losses: self._virtual(self.weight_net(losses)),
                                                     lambda: phi, lr)
            w = self._virtual(self.weight_net(problem.detached_losses()))
            if self.lookahead:
                g = problem.lookahead_alignment(w.detach(), lr, step_gradient)
            else:
                g = problem.alignment()
            surrogate = -lr * (g.to(w.dtype) * w).sum()
            return list(torch.autograd.grad(surrogate, phi))

    def meta_update(
        self, problem: MetaProblem, lr: float, step_gradient: Sequence[Tensor | None] | None = None
    ) -> None:
        """One meta-optimizer step on ``phi`` (its gradient averaged across processes)."""
        grads = problem.all_reduce(self.meta_gradient(problem, lr, step_gradient))
        for p, g in zip(self.weight_net.parameters(), grads):
            p.grad = g.to(p.dtype)
        self.meta_opt.step()
        self.meta_opt.zero_grad(set_to_none=True)

    def meta_weights(self, problem: MetaProblem, lr: float) -> Tensor:
        """Update ``phi`` with one meta-optimizer step (gradient averaged across processes); new weights."""
        self.meta_update(problem, lr)
        return self.weights(problem.detached_losses())

    def extra_state(self) -> dict[str, Any]:
        """The meta-optimizer's state."""
        return {"meta_opt": self.meta_opt.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the meta-optimizer's state."""
        if "meta_opt" in state:
            self.meta_opt.load_state_dict(state["meta_opt"])
