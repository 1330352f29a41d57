"""Susceptibility to noisy labels (Forouzesh, Sedghi & Thiran, ICLR 2023): one probe step on random labels.

The probe takes a batch of inputs with labels drawn uniformly at random, computes the loss, takes one step of the
*training* optimizer (its current learning rate, momentum buffers and weight decay) on that loss, computes the loss
again on the same batch, and puts everything back. The drop ``loss_before - loss_after`` is large when the network
can fit arbitrary labels quickly, i.e. when it is memorising; its running mean over epochs is the susceptibility
``zeta``.

Everything the step touches is restored exactly and in memory: parameters, buffers (BatchNorm running statistics
and ``num_batches_tracked``), gradients, the optimizer's state and hyperparameters, and the random number
generators (torch CPU and CUDA, Python ``random``, NumPy), so a training run that probes is bit-identical to one
that does not.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_reweight._layers import rewrites_own_weights
from lightning_reweight.functional._sgd import is_plain_sgd, sgd_update_

__all__ = [
    "needs_closure",
    "preserved_rng",
    "preserved_training_state",
    "susceptibility_losses",
    "susceptibility_step",
]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global random number generators on exit.

    Covers torch's CPU generator, every CUDA device's generator (when CUDA is initialised), Python's ``random``
    and NumPy's global generator (when NumPy is imported).

    Example:
        >>> import torch
        >>> with preserved_rng():
        ...     a = torch.rand(1)
        >>> bool(torch.equal(a, torch.rand(1)))
        True
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    py = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np_mod is not None and np_state is not None:
            np_mod.random.set_state(np_state)


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (``torch.optim.LBFGS``): the probe cannot step it.

    Example:
        >>> import torch
        >>> p = [torch.zeros(1, requires_grad=True)]
        >>> needs_closure(torch.optim.SGD(p, lr=0.1)), needs_closure(torch.optim.LBFGS(p))
        (False, True)
    """
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin or wrapped step without a signature
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def _snapshot_value(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


def _tensors_of(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Every parameter (the model's and the optimizer's, once each), every buffer, the in-place-written parameters.

    The last are the parameters ``model``'s forward writes in place
    (:func:`~lightning_reweight._layers.rewrites_own_weights`). One walk over the module tree, remembering modules
    by identity: ``nn.Module.modules()`` hashes every module, and some (torchmetrics metrics) hash their whole
    state; repeated walks were a visible share of the probe's cost.
    """
    params: dict[int, Tensor] = {}
    buffers: dict[int, Tensor] = {}
    rewritten: list[Tensor] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        for p in module._parameters.values():
            if p is not None:
                params.setdefault(id(p), p)
        if rewrites_own_weights(module):
            rewritten.extend(p for p in module._parameters.values() if p is not None)
        for b in module._buffers.values():
            if b is not None:
                buffers.setdefault(id(b), b)
        stack.extend(m for m in module._modules.values() if m is not None)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                params.setdefault(id(p), p)
    return list(params.values()), list(buffers.values()), rewritten


@contextlib.contextmanager
def _restored_values(tensors: list[Tensor]) -> Iterator[None]:
    """Copy the values of ``tensors`` back in place on exit (the tensor objects stay the same)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)


@contextlib.contextmanager
def preserved_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Iterator[list[Tensor]]:
    """Restore parameters, buffers, gradients and optimizer state exactly on exit (in memory, no disk).

    Parameters and buffers are copied back in place (so references held elsewhere, e.g. by the optimizer or a DDP
    wrapper, stay valid); gradient tensors are put back by reference; optimizer state tensors are copied back into
    the original tensor objects, state created during the block is removed, and ``param_groups`` hyperparameters
    are restored. The random number generators are restored too (:func:`preserved_rng`).

    Args:
        model: the module whose parameters and buffers to preserve.
        optimizer: the optimizer whose parameters and state to preserve as well.

    Yields:
        The preserved parameters (the model's and the optimizer's, each once).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 1)
        >>> before = net.weight.detach().clone()
        >>> with preserved_training_state(net):
        ...     with torch.no_grad():
        ...         _ = net.weight.add_(1.0)
        >>> bool(torch.equal(net.weight, before))
        True
    """
    param_list, buffer_list, _ = _tensors_of(model, optimizer)
    grads = [p.grad for p in param_list]
    opt_state: dict[Any, dict[str, tuple[Any, Any]]] = {}
    groups: list[dict[str, Any]] = []
    opt_called = None
    if optimizer is not None:
        for p, state in optimizer.state.items():
            opt_state[p] = {k: (v, _snapshot_value(v)) for k, v in state.items()}
        groups = [{k: _snapshot_value(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        opt_called = optimizer.__dict__.get("_opt_called")
    with preserved_rng(), _restored_values(param_list + buffer_list):
        try:
            yield param_list
        finally:
            for p, g in zip(param_list, grads):
                p.grad = g
            if optimizer is not None:
                for p in [p for p in optimizer.state if p not in opt_state]:
                    del optimizer.state[p]
                for p, entries in opt_state.items():
                    state = optimizer.state[p]
                    state.clear()
                    for k, (orig, saved) in entries.items():
                        if isinstance(orig, Tensor):
                            with torch.no_grad():
                                orig.copy_(saved)
                            state[k] = orig
                        else:
                            state[k] = saved
                for group, saved_group in zip(optimizer.param_groups, groups):
                    for k in [k for k in group if k != "params" and k not in saved_group]:
                        del group[k]
                    group.update(saved_group)
                if opt_called is None:
                    optimizer.__dict__.pop("_opt_called", None)
                else:
                    optimizer.__dict__["_opt_called"] = opt_called


def susceptibility_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    random_targets: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The loss drop of one training-optimizer step on randomly labelled inputs; all state is left unchanged.

    ``drop = L(theta) - L(theta')`` where ``L`` is the loss on ``(inputs, random_targets)``, ``L(theta)`` is the
    loss of the forward whose gradient is used, and ``theta'`` is the result of ``optimizer.step()`` on that
    gradient alone (the gradients the caller had accumulated are set aside, and put back afterwards). Both
    forwards run in the model's current mode with the same random state, so dropout draws the same masks twice.

    Parameters, buffers, gradients, optimizer state and hyperparameters, and the random number generators are
    exactly as before when the function returns (see :func:`preserved_training_state`).

    Two routes give the same drop. For ``torch.optim.SGD`` itself (the paper's optimizer) the step is SGD's own
    update rule applied to the parameters directly, with the gradient from ``torch.autograd.grad``: nothing of
    the optimizer is written, so only parameters, buffers and the random number generators are saved and put
    back, and no optimizer step hooks fire. Any other optimizer (a subclass of SGD included) is stepped with
    ``optimizer.step()`` under :func:`preserved_training_state`; its step pre/post hooks, if any, then run once.

    Args:
        model: the network; its parameters must be (among) the optimizer's.
        optimizer: the training optimizer, stepped once with its current settings.
        inputs: a batch of inputs.
        random_targets: integer class labels of shape ``(B,)``, drawn uniformly at random by the caller.
        loss_fn: ``loss_fn(logits, targets) -> scalar``; default mean cross-entropy (computed in fp32).
        forward: ``forward(inputs) -> logits``; default ``model(inputs)`` (pass a wrapper to add an autocast
            context or to pick the logits out of a richer output).

    Returns:
        The drop as a detached fp32 scalar tensor (positive when the step fitted the random labels).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randint(3, (8,))
        >>> w = net.weight.detach().clone()
        >>> drop = susceptibility_step(net, opt, x, y)
        >>> bool(drop > 0), bool(torch.equal(net.weight, w)), len(opt.state)
        (True, True, 0)
    """
    before, after = susceptibility_losses(model, optimizer, inputs, random_targets, loss_fn=loss_fn, forward=forward)
    return before - after


def susceptibility_losses(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: Tensor,
    random_targets: Tensor,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The random-label loss before and after the probe step: :func:`susceptibility_step` is their difference.

    The loss before the step says how confidently the network contradicts arbitrary labels; a large drop on a
    network that is merely confident (high loss before) is not the same as one on a network that fits them fast.
    Same arguments, routes and guarantees as :func:`susceptibility_step`.

    Returns:
        ``(loss_before, loss_after)``, detached fp32 scalar tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(3, (8,))
        >>> before, after = susceptibility_losses(net, opt, x, y)
        >>> bool(torch.isclose(before, nn.functional.cross_entropy(net(x), y)))
        True
    """
    if random_targets.dim() != 1 or random_targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"random_targets must have shape ({inputs.shape[0]},) to match inputs, got {tuple(random_targets.shape)}"
        )
    plain_sgd = is_plain_sgd(optimizer)
    if not plain_sgd and needs_closure(optimizer):  # SGD's step takes no closure: skip the signature lookup
        raise ValueError(
            f"{type(optimizer).__name__}.step needs a closure (it re-evaluates the loss): one probe step of it is "
            "not defined"
        )
    loss_fn = loss_fn if loss_fn is not None else _cross_entropy
    fwd = forward if forward is not None else model
    if plain_sgd:
        sgd = cast(torch.optim.SGD, optimizer)  # is_plain_sgd: exactly torch.optim.SGD
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        # the stepped parameters, and frozen ones the forward writes in place (Embedding(max_norm=...) renormalises
        # its rows); other frozen parameters (a frozen backbone) are not copied
        _, buffers, rewritten = _tensors_of(model, None)
        stepped = {id(p) for p in params}
        restored = params + [p for p in rewritten if id(p) not in stepped]
        with preserved_rng(), _restored_values(restored + buffers):
            return _losses(fwd, loss_fn, inputs, random_targets, lambda loss: _sgd_step(sgd, params, loss))
    with preserved_training_state(model, optimizer) as params:
        return _losses(fwd, loss_fn, inputs, random_targets, lambda loss: _optimizer_step(optimizer, params, loss))


def _losses(
    fwd: Callable[[Tensor], Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    step: Callable[[Tensor], None],
) -> tuple[Tensor, Tensor]:
    """``loss_fn`` before and after ``step(loss)``; both forwards see the same random state (dropout masks)."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    with torch.enable_grad():
        loss_before = loss_fn(fwd(inputs), targets)
        step(loss_before)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    with torch.no_grad():
        loss_after = loss_fn(fwd(inputs), targets)
    return loss_before.detach().float(), loss_after.detach().float()


def _sgd_step(optimizer: torch.optim.SGD, params: list[Tensor], loss: Tensor) -> None:
    """Plain SGD's step without the optimizer; the caller restores parameters, buffers and RNGs.

    The gradient comes from ``torch.autograd.grad`` (``.grad`` is never written) and SGD's rule is applied in place
    (:func:`sgd_update_`; momentum buffers only read).
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    sgd_update_(optimizer, {p: g for p, g in zip(params, grads) if g is not None})


def _optimizer_step(optimizer: torch.optim.Optimizer, params: list[Tensor], loss: Tensor) -> None:
    """Any optimizer's step; the caller holds :func:`preserved_training_state`.

    The gradient of ``loss`` alone goes into ``.grad``, then ``optimizer.step()`` runs.
    """
    for p in params:
        p.grad = None
    loss.backward()
    optimizer.step()


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.float(), targets)
