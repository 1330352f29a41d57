"""Learning to Reweight weights for one batch, stateless (no Lightning)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_reweight.meta.engine import FD_EPS, FdScale, Hypergrad, MetaProblem
from lightning_reweight.meta.l2rw import l2rw_from_alignment

__all__ = ["l2rw_weights"]


def l2rw_weights(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    meta_inputs: Tensor,
    meta_targets: Tensor,
    *,
    hypergrad: Hypergrad = "forward",
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    lr: float = 1.0,
    fd_eps: float = FD_EPS,
    fd_scale: FdScale = "all",
) -> Tensor:
    """The L2RW weights of one training batch against one clean meta batch.

    ``w_i = max(u_i, 0) / sum_j max(u_j, 0)`` with ``u_i = <grad l_i(theta), grad L_meta(theta)>`` (the paper's
    ``-dL_meta/d eps_i`` at ``eps = 0``, up to the positive factor ``lr``). The model's parameters, buffers
    (BatchNorm running statistics), the global RNG stream and any optimizer are left untouched; the model is
    evaluated in whatever mode it is in (train mode, as the paper does).

    Args:
        model: maps ``inputs`` to logits.
        inputs: training inputs, ``(B, ...)``.
        targets: training labels ``(B,)``.
        meta_inputs: clean meta inputs.
        meta_targets: clean meta labels.
        hypergrad: ``"forward"`` (exact, forward-mode AD), ``"finite_diff"`` (one extra forward) or
            ``"second_order"`` (double backward through the virtual step).
        loss_fn: per-sample loss ``(logits, targets) -> (B,)``; default cross-entropy. The meta loss is its mean.
        lr: virtual-step size (only used by ``"second_order"``; it scales ``u`` and cancels in ``w``).
        fd_eps: relative finite-difference step (``"finite_diff"``; default
            :data:`~lightning_reweight.meta.engine.FD_EPS`).
        fd_scale: ``"all"`` or ``"moved"``: the parameters whose norm scales the finite-difference step (see
            :class:`~lightning_reweight.meta.MetaProblem`).

    Raises:
        ValueError: when ``loss_fn`` does not return one loss per sample.
        RuntimeError: inside ``torch.inference_mode()`` (the weights need gradients).

    Returns:
        Non-negative weights ``(B,)`` summing to one, or all zero when no sample's gradient aligns with the meta
        gradient. Multiply by ``B`` for the mean scale of :mod:`lightning_reweight.contract`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        >>> w = l2rw_weights(net, x, y, x, y)
        >>> bool((w >= 0).all()), round(float(w.sum()), 4)
        (True, 1.0)
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("l2rw_weights differentiates the model: call it outside torch.inference_mode()")
    if len(meta_targets) == 0 or len(targets) == 0:
        raise ValueError(
            f"l2rw_weights needs a non-empty training and meta batch, got {len(targets)} and {len(meta_targets)} "
            "samples"
        )
    criterion = loss_fn if loss_fn is not None else (lambda z, t: F.cross_entropy(z, t, reduction="none"))

    def train_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        losses = criterion(model(batch[0]), batch[1])
        if losses.shape != batch[1].shape[:1]:
            raise ValueError(
                f"loss_fn must return per-sample losses of shape ({batch[1].shape[0]},), got {tuple(losses.shape)} "
                "(use reduction='none', e.g. lambda z, y: F.cross_entropy(z, y, reduction='none'))"
            )
        return losses

    def meta_loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        return criterion(model(batch[0]), batch[1]).mean()

    problem = MetaProblem(model, train_loss, meta_loss, (inputs, targets), (meta_inputs, meta_targets),
                          hypergrad=hypergrad, fd_eps=fd_eps, fd_scale=fd_scale)
    if hypergrad == "second_order":
        u = problem.alignment_at_lr(lr)
    else:
        u = problem.alignment()
    return l2rw_from_alignment(u)
