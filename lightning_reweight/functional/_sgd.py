"""``torch.optim.SGD``'s update rule applied to the parameters without touching the optimizer.

The susceptibility probe takes one step of the training optimizer and undoes it. For plain SGD (the paper's
optimizer and the library's default) the step is written out here: the parameters move in place exactly as
``SGD.step()`` would move them, while the momentum buffers are only read (the updated buffer is a new tensor), so
the optimizer's state never needs a snapshot and the caller only restores the parameters.

The arithmetic is the optimizer's own, op for op (PyTorch's single-tensor SGD):

    d = -g if maximize else g
    d = d + weight_decay * p                                  (weight_decay != 0)
    b = d  (first step)  or  momentum * b + (1 - dampening) * d   (momentum != 0)
    d = d + momentum * b  (nesterov)  or  b
    p = p - lr * d
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

__all__ = ["is_plain_sgd", "sgd_update_"]


def is_plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """True for an optimizer whose ``step()`` is exactly :func:`sgd_update_`.

    That is ``torch.optim.SGD`` itself (not a subclass, which may override ``step``), with float learning rates,
    neither the fused nor the differentiable kernel, and no step hooks (a pre-hook that clips the gradients is
    part of the step: such an optimizer is stepped for real).
    """
    if type(optimizer) is not torch.optim.SGD or _has_step_hooks(optimizer):
        return False
    return all(
        not group.get("fused") and not group.get("differentiable") and not isinstance(group["lr"], Tensor)
        for group in optimizer.param_groups
    )


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    from torch.optim import optimizer as optim_module

    hooks = (
        getattr(optimizer, "_optimizer_step_pre_hooks", None),
        getattr(optimizer, "_optimizer_step_post_hooks", None),
        getattr(optim_module, "_global_optimizer_pre_hooks", None),
        getattr(optim_module, "_global_optimizer_post_hooks", None),
    )
    return any(bool(h) for h in hooks)


@torch.no_grad()
def sgd_update_(optimizer: torch.optim.SGD, grads: dict[Tensor, Tensor]) -> None:
    """Move every parameter of ``optimizer`` with a gradient in ``grads`` by one SGD step, in place.

    Parameters without a gradient are left alone (as ``SGD.step()`` skips ``grad is None``). The momentum buffers
    in ``optimizer.state`` are read, never written.

    Args:
        optimizer: a plain ``torch.optim.SGD`` (see :func:`is_plain_sgd`).
        grads: gradient of each parameter to step, keyed by the parameter.
    """
    for group in optimizer.param_groups:
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
        params = [p for p in group["params"] if p in grads]
        if not params:
            continue
        d: list[Tensor] | tuple[Tensor, ...] = [grads[p] for p in params]
        if maximize:
            d = torch._foreach_neg(d)
        if weight_decay != 0:
            d = torch._foreach_add(d, params, alpha=weight_decay)
        if momentum != 0:
            state = optimizer.state
            bufs: list[Tensor | None] = [state[p].get("momentum_buffer") if p in state else None for p in params]
            have = [i for i, buf in enumerate(bufs) if buf is not None]
            if have:  # momentum * buf + (1 - dampening) * d, as new tensors: the stored buffers stay as they are
                moved = torch._foreach_mul(cast(list[Tensor], [bufs[i] for i in have]), momentum)
                torch._foreach_add_(moved, [d[i] for i in have], alpha=1 - dampening)
                for i, buf in zip(have, moved):
                    bufs[i] = buf
            filled = [dp if buf is None else buf for dp, buf in zip(d, bufs)]
            d = torch._foreach_add(d, filled, alpha=momentum) if nesterov else filled
        torch._foreach_add_(params, d, alpha=-lr)
