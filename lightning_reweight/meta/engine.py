"""The meta-gradient engine: per-sample alignment of a training batch with a clean meta batch.

Learning to Reweight and Meta-Weight-Net both reduce to per-sample alignment scalars

    G_i = <grad_theta l_i(theta), d>,

the directional derivative of the per-sample training loss vector along a direction ``d`` that is the gradient
of the meta loss (at ``theta`` for L2RW; at the virtual-step parameters ``theta'`` for MW-Net). Three routes:

* ``"forward"``: one forward-mode Jacobian-vector product of the loss vector along ``d``
  (``torch.autograd.forward_ad``). Exact.
* ``"finite_diff"``: ``(l_i(theta + h d) - l_i(theta)) / h`` with ``h = fd_eps * max(|theta|, 1) / |d|``; one
  no-grad forward, reusing the training forward's losses when they are fp32. Approximate (first order in h).
* ``"second_order"``: the textbook route, double backward through a virtual SGD step
  ``theta' = theta - lr * grad_theta sum_i w_i l_i``. The reference.

Every extra forward runs through :func:`torch.func.functional_call` with **cloned buffers** (BatchNorm running
statistics of the real model never change), inside :func:`torch.random.fork_rng` (the global RNG stream is
restored afterwards), and forwards of the training batch replay the RNG state saved before the training forward
(``rng_state``), so dropout draws the same masks as the training forward did (meta-batch forwards replay it too,
so that every route sees the same meta masks). This replay is exact only if the
training forward is the first consumer of the RNG after the state was saved. The optimizer is never touched.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_reweight._forwards import extra_forwards
from lightning_reweight._layers import is_compiled, rewrites_own_weights

__all__ = ["FD_EPS", "HYPERGRADS", "MetaProblem", "RNGState", "capture_rng"]

#: The hypergradient routes: double backward (the reference), forward-mode JVP (exact), finite difference.
HYPERGRADS: tuple[str, ...] = ("second_order", "forward", "finite_diff")
#: the hypergradient routes (a type for signatures and config parsers)
Hypergrad = Literal["finite_diff", "forward", "second_order"]
#: which parameters' norm scales the finite-difference step
FdScale = Literal["all", "moved"]
#: The default relative finite-difference step (``|h d| = FD_EPS * max(|theta|, 1)``). 1e-3 was 5-10 times less
#: accurate on trained models (``benchmarks/fd_accuracy.py``); fp32 rounding of the losses takes over below ~3e-5.
FD_EPS = 1e-4

#: ``(cpu_state, cuda_state_or_None, cuda_device_index_or_None)``
RNGState = tuple[Tensor, "Tensor | None", "int | None"]


def capture_rng(device: torch.device | None = None) -> RNGState:
    """Save the CPU (and the CUDA device's) RNG state, to replay a forward's random draws later.

    Example:
        >>> state = capture_rng()
        >>> a = torch.rand(2)
        >>> torch.set_rng_state(state[0])
        >>> torch.equal(a, torch.rand(2))
        True
    """
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.get_rng_state(), torch.cuda.get_rng_state(index), index
    return torch.get_rng_state(), None, None


class _Call(nn.Module):
    """Wraps a closure over ``root`` so that ``functional_call`` can swap ``root``'s parameters under it."""

    def __init__(self, root: nn.Module, fn: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.root = root
        self._fn = fn

    def forward(self, batch: Any) -> Tensor:
        with extra_forwards():  # not the training step's forward (for hooks that look for that one)
            return self._fn(batch)


FD_SCALES: tuple[str, ...] = ("all", "moved")
_MOVED_SHARE_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models checked by _check_moved_share


def _check_moved_share(theta: Sequence[Tensor], direction: Sequence[Tensor]) -> None:
    """Once per model: warn when the finite-difference direction moves a small part of the parameters."""
    full = _norm(theta)
    moved = _norm([t * (d != 0) for t, d in zip(theta, direction)])
    if full > 1.0 and moved < 0.25 * full:
        warnings.warn(
            f'hypergrad="finite_diff": the direction moves parameters of norm {moved:.3g}, but the step is scaled by '
            f"the norm of all trainable parameters ({full:.3g}; e.g. an embedding table the batch barely touches), "
            f'so it is too large for a first-order difference: pass fd_scale="moved", or use hypergrad="forward"',
            UserWarning,
            stacklevel=4,
        )


def _at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64 (a float64 model keeps its precision)."""
    return t if t.dtype == torch.float64 else t.float()


def _norm(a: Sequence[Tensor]) -> float:
    """The float64 norm of all of ``a``; one host sync (the squared sums are read together, then summed in order)."""
    if not a:
        return 0.0
    return math.sqrt(float(sum(torch.stack([(x.double() ** 2).sum() for x in a]).tolist())))


def _tf32_enabled(device_type: str) -> bool:
    """Whether CUDA matmuls or convolutions may run in TF32 (cuDNN's default for convolutions)."""
    return device_type == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions; the caller's settings back on exit."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@dataclass
class MetaProblem:
    """One training batch, one meta batch, a module and its losses: the engine's input.

    Args:
        module: the model whose trainable parameters ``theta`` are differentiated (not modified).
        train_loss: ``batch -> (B,)`` per-sample training losses, computed by calling ``module`` normally.
        meta_loss: ``batch -> scalar`` meta (clean) loss, computed by calling ``module`` normally.
        train_batch: the training batch.
        meta_batch: the meta batch.
        hypergrad: ``"forward"``, ``"finite_diff"`` or ``"second_order"``.
        losses: the training forward's per-sample losses, if already computed (fp32 ones are reused by
            ``"finite_diff"``; if they carry a graph to ``module``'s parameters and ``reuse_graph`` is set, the
            virtual step differentiates them instead of running a new forward).
        rng_state: RNG state saved just before the training forward (see :func:`capture_rng`); defaults to
            the state when the problem is created.
        buffers: the module's buffers saved just before the training forward, by name (a forward that updates a
            buffer it reads, like ``spectral_norm``'s power iteration, would otherwise be replayed one update
            later); defaults to the buffers as they are when each forward runs.
        fd_eps: relative finite-difference step: ``|h d| = fd_eps * max(|theta|, 1)`` (default :data:`FD_EPS`).
        fd_scale: which ``|theta|`` sets the step: ``"all"`` (every trainable parameter; the default) or
            ``"moved"`` (only the entries the direction moves, ``d != 0``): for models where a batch touches a small
            part of the parameters (embedding tables), whose full norm would make the step far too large.
        lr_scale: each trainable parameter's learning rate relative to the virtual step's ``lr`` (an optimizer
            with several parameter groups, or parameters it does not train: 0); ``None``: all 1. The virtual step is
            ``theta - lr * lr_scale * grad`` and the alignments use ``lr_scale * grad L_meta`` (``-dL_meta/d eps``).
        reduce: averages a list of tensors across processes (DDP); identity by default.
        reuse_graph: let the virtual step backpropagate through ``losses``' graph (single process only).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(3, 2)
        >>> ce = lambda b: nn.functional.cross_entropy(net(b[0]), b[1], reduction="none")
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
        >>> problem = MetaProblem(net, ce, lambda b: ce(b).mean(), batch, batch, hypergrad="forward")
        >>> problem.alignment().shape
        torch.Size([4])
    """

    module: nn.Module
    train_loss: Callable[[Any], Tensor]
    meta_loss: Callable[[Any], Tensor]
    train_batch: Any
    meta_batch: Any
    hypergrad: Hypergrad = "forward"
    losses: Tensor | None = None
    rng_state: RNGState | None = None
    buffers: dict[str, Tensor] | None = None
    fd_eps: float = FD_EPS
    fd_scale: FdScale = "all"
    lr_scale: Sequence[float] | None = None
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None
    reuse_graph: bool = False
    _names: list[str] = field(init=False, repr=False)
    _params: list[Tensor] = field(init=False, repr=False)
    _prepared: bool = field(init=False, repr=False, default=False)
    _early: Any = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.hypergrad not in HYPERGRADS:
            raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {self.hypergrad!r}")
        if not (self.fd_eps > 0 and math.isfinite(self.fd_eps)):
            raise ValueError(f"fd_eps must be a positive number, got {self.fd_eps}")
        if self.fd_scale not in FD_SCALES:
            raise ValueError(f"fd_scale must be one of {FD_SCALES}, got {self.fd_scale!r}")
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        if self.lr_scale is not None:
            scale = [float(r) for r in self.lr_scale]
            if len(scale) != len(self._params) or any(r < 0 for r in scale):
                raise ValueError(
                    f"lr_scale needs one non-negative factor per trainable parameter ({len(self._params)}), got "
                    f"{len(scale)}"
                )
            self.lr_scale = None if all(r == 1.0 for r in scale) else scale
        if self.rng_state is None:
            self.rng_state = capture_rng(self._params[0].device)
        # losses computed under autocast (bf16/fp16 matmuls, even if the loss itself is fp32) cannot stand in
        # for l(theta) in an fp32 finite difference
        self._autocast = torch.is_autocast_enabled(self._params[0].device.type)
        self._tf32 = _tf32_enabled(self._params[0].device.type)
        self._train_call = _Call(self.module, self.train_loss)
        self._meta_call = _Call(self.module, self.meta_loss)
        modules = list(self.module.modules())
        # a module registered under two names (nn.Sequential(lin, act, lin), ALBERT-style layer lists): PyTorch's
        # functional_call puts the wrong tensors back after swapping it twice; its entries are restored here
        paths = sum(1 for _ in self.module.named_modules(remove_duplicate=False))
        self._shared_modules = modules if paths > len(modules) else None
        # layers that write their weights in place during the forward (Embedding(max_norm=...) renormalises rows):
        # the extra forwards get copies, not the model's own tensors
        self._copy_params = any(rewrites_own_weights(m) for m in modules)
        self._compiled = any(is_compiled(m) for m in modules)
        if self._compiled:
            if self.hypergrad == "second_order":
                raise ValueError(
                    "hypergrad='second_order' backpropagates through a backward, which torch.compile'd code does "
                    "not support: use hypergrad='finite_diff' with a compiled model"
                )
            # a compiled graph frees its saved tensors at the first backward (donated buffers): the virtual step
            # recomputes the losses instead of backpropagating through the training forward's graph a second time
            self.reuse_graph = False

    # ----------------------------------------------------------------- plumbing
    def _scaled(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``lr_scale * tensors``, parameter by parameter (unchanged without ``lr_scale``)."""
        if self.lr_scale is None:
            return list(tensors)
        return [t if r == 1.0 else t * r for t, r in zip(tensors, self.lr_scale)]

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters ``theta`` (the module's own tensors; never modified)."""
        return self._params

    def _state(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        state = {f"root.{n}": p for n, p in zip(self._names, params)}
        saved = self.buffers or {}
        for n, b in self.module.named_buffers():
            # BatchNorm running statistics: updated on the clones only; the pre-forward values where saved
            state[f"root.{n}"] = saved.get(n, b).clone()
        return state

    @contextlib.contextmanager
    def _fp32(self) -> Iterator[None]:
        device = self._params[0].device.type
        with torch.autocast(device_type=device, enabled=False):
            yield

    @contextlib.contextmanager
    def _full_fp32(self) -> Iterator[None]:
        """No TF32 (CUDA matmuls and convolutions): the finite difference's forwards and their ``l(theta)``.

        TF32 keeps 10 mantissa bits (relative rounding ~5e-4), coarser than the perturbation ``fd_eps`` makes;
        the exact routes' extra passes keep the user's setting (their error is rounding-sized either way).
        """
        if not self._tf32:
            yield
            return
        with _no_tf32():
            yield

    def _replay(self) -> None:
        cpu, cuda, index = self.rng_state  # type: ignore[misc]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, cast(int, index))  # capture_rng pairs a CUDA state with its index

    @contextlib.contextmanager
    def _forked(self) -> Iterator[None]:
        index = self.rng_state[2]  # type: ignore[index]
        # the exact routes differentiate attention twice (or forward-mode): only the math kernel of
        # scaled_dot_product_attention has those derivatives (flash attention on CPU has neither)
        kernels = sdpa_kernel(SDPBackend.MATH) if self.hypergrad != "finite_diff" else contextlib.nullcontext()
        with torch.random.fork_rng(devices=[] if index is None else [index]), self._fp32(), kernels:
            yield  # autocast off for the backward passes too (they follow the autocast state of the caller)

    def _theta(self) -> list[Tensor]:
        """``theta`` detached: aliases of the parameters, or copies when a layer writes its weights in place."""
        return [p.detach().clone() if self._copy_params else p.detach() for p in self._params]

    def _functional(self, call: _Call, params: Sequence[Tensor], batch: Any) -> Tensor:
        if self._shared_modules is None:
            return functional_call(call, self._state(params), (batch,))
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self._shared_modules]
        try:
            return functional_call(call, self._state(params), (batch,))
        finally:
            for m, parameters, buffers in saved:
                m._parameters.update(parameters)
                m._buffers.update(buffers)

    def train_losses_at(self, params: Sequence[Tensor]) -> Tensor:
        """Per-sample training losses at ``params`` (fp32, cloned buffers, the training forward's RNG)."""
        self._replay()
        with self._fp32():
            return _at_least_fp32(self._functional(self._train_call, params, self.train_batch))

    def meta_loss_at(self, params: Sequence[Tensor]) -> Tensor:
        """The meta loss at ``params`` (fp32, cloned buffers, random draws replayed from ``rng_state`` too)."""
        self._replay()
        with self._fp32():
            return _at_least_fp32(self._functional(self._meta_call, params, self.meta_batch))

    def all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        """Average ``tensors`` across processes with ``reduce`` (identity in a single process)."""
        return list(self.reduce(tensors)) if self.reduce is not None else tensors

    def attach_losses(self, losses: Tensor) -> None:
        """Hand over the training forward's per-sample losses after the problem was made (see :meth:`prepare`).

        Whether they were computed under autocast is read now, where the forward ran.
        """
        self.losses = losses
        self._autocast = torch.is_autocast_enabled(self._params[0].device.type)

    def prepare(self) -> None:
        """Compute now the part of :meth:`alignment` that does not need the training forward's losses.

        Called before the training forward (``MetaReweight`` does it in ``on_train_batch_start`` for strategies
        that need only the alignment, like L2RW), so that the meta forward and backward and the shifted forward
        run while the training graph does not exist yet: less memory alive at once (and, on CPU, a slightly
        faster finite difference). ``"finite_diff"`` keeps the shifted losses and finishes in :meth:`alignment`
        with the training forward's losses (:meth:`attach_losses`); the other routes compute the whole alignment
        here.
        """
        if self.hypergrad == "finite_diff":
            self._early = self._fd_shift(self._scaled(self.meta_gradient(reduce=True)))
        else:
            self._early = self.alignment()
        self._prepared = True

    def loss_gap(self, losses: Tensor) -> Tensor:
        """How far ``losses`` (the training forward's) are from ``train_loss(train_batch)`` replayed at ``theta``.

        The fast routes take ``l(theta)`` (finite differences) and MW-Net's weights and virtual step from the
        training forward's losses, but evaluate ``train_loss`` everywhere else: both must be one function. One
        extra forward.

        Returns:
            ``max |losses - replayed| / max(max |replayed|, 1)``, a 0-d float tensor (``inf`` for another shape).
        """
        with self._forked(), torch.no_grad():
            replayed = self.train_losses_at(self._theta())
        got = _at_least_fp32(losses.detach())
        if got.shape != replayed.shape:
            return torch.tensor(float("inf"), device=replayed.device)
        if replayed.numel() == 0:
            return torch.zeros((), device=replayed.device)
        return ((got - replayed).abs().max() / replayed.abs().max().clamp_min(1.0)).float()

    def loss_tolerance(self, losses: Tensor) -> float:
        """The :meth:`loss_gap` that rounding alone explains: larger for a low-precision or autocast forward."""
        return 5e-2 if self._autocast or losses.dtype in (torch.float16, torch.bfloat16) else 1e-4

    def detached_losses(self) -> Tensor:
        """The training losses at ``theta`` in fp32, detached (the training forward's, or recomputed)."""
        base = self._base_losses()
        if base is None:
            with self._forked(), self._full_fp32(), torch.no_grad():
                base = self.train_losses_at(self._theta())
        return base

    def _base_losses(self) -> Tensor | None:
        """The training forward's losses, when they can stand in for ``l(theta)`` in fp32 (not under TF32 either)."""
        if self.losses is None or self.losses.dtype != torch.float32 or self._autocast or self._tf32:
            return None
        return self.losses.detach()

    # ----------------------------------------------------------------- directions
    def meta_gradient(self, params: Sequence[Tensor] | None = None, *, reduce: bool = False) -> list[Tensor]:
        """``grad L_meta`` at ``params`` (default ``theta``); averaged across processes if ``reduce``."""
        with self._forked():
            p = [t.detach().requires_grad_(True) for t in (params if params is not None else self._theta())]
            with torch.enable_grad():
                loss = self.meta_loss_at(p)
                grads = torch.autograd.grad(loss, p, allow_unused=True)
        out = [torch.zeros_like(t) if g is None else g for t, g in zip(p, grads)]
        return self.all_reduce(out) if reduce else out

    def virtual_params(self, weights: Tensor, lr: float) -> list[Tensor]:
        """``theta' = theta - lr * grad_theta sum_i weights_i l_i(theta)`` (plain SGD, detached)."""
        w = _at_least_fp32(weights.detach())
        if self.reuse_graph and self.losses is not None and self.losses.requires_grad:
            grads = torch.autograd.grad((w * self.losses.float()).sum(), self._params, retain_graph=True,
                                        allow_unused=True)
        else:
            with self._forked(), torch.enable_grad():
                p = [t.requires_grad_(True) for t in self._theta()]
                grads = torch.autograd.grad((w * self.train_losses_at(p)).sum(), p, allow_unused=True)
        steps = self._scaled([torch.zeros_like(t) if g is None else g.detach() for t, g in zip(self._params, grads)])
        return [t.detach() - lr * g for t, g in zip(self._params, steps)]

    # ----------------------------------------------------------------- alignment
    def directional(self, direction: Sequence[Tensor]) -> Tensor:
        """``J d``: the derivative of the per-sample loss vector at ``theta`` along ``direction``, shape (B,).

        ``"forward"`` is exact (forward-mode AD); ``"finite_diff"`` is a one-sided difference;
        ``"second_order"`` obtains it by double backward (``d/d eps`` of ``<grad sum eps_i l_i, d>``).
        """
        theta = self._theta()
        with self._forked(), torch.no_grad():
            if self.hypergrad == "forward":
                with fwAD.dual_level():
                    try:
                        dual = [fwAD.make_dual(t, d.to(t.dtype).to_dense()) for t, d in zip(theta, direction)]
                        primal, tangent = fwAD.unpack_dual(self.train_losses_at(dual))
                    except NotImplementedError as err:  # a layer without forward-mode AD in this PyTorch
                        if self._compiled:
                            raise NotImplementedError(
                                f'hypergrad="forward" needs forward-mode AD through the model, which its '
                                f'torch.compile\'d code does not have ({err}): use hypergrad="finite_diff" with a '
                                "compiled model"
                            ) from err
                        raise NotImplementedError(
                            f'hypergrad="forward" needs forward-mode AD through the whole model, which PyTorch does '
                            f'not have for one of its layers or tensors ({err}; sparse gradients, e.g. '
                            f'Embedding(sparse=True), too); use hypergrad="finite_diff" (any model) or "second_order"'
                        ) from err
                return torch.zeros_like(primal) if tangent is None else _at_least_fp32(tangent)
            if self.hypergrad == "finite_diff":
                return self._fd_finish(self._fd_shift(direction))
            with torch.enable_grad():
                p = [t.requires_grad_(True) for t in (x.clone() for x in theta)]
                losses = self.train_losses_at(p)
                eps = torch.zeros_like(losses, requires_grad=True)
                grads = torch.autograd.grad((eps * losses).sum(), p, create_graph=True, allow_unused=True)
                terms = [(g * d).sum() for g, d in zip(grads, direction) if g is not None]
                if not terms:  # no parameter moves the losses: every alignment is 0 (as on the other routes)
                    return torch.zeros_like(losses.detach())
                (u,) = torch.autograd.grad(torch.stack(terms).sum(), eps, allow_unused=True)
                return torch.zeros_like(losses.detach()) if u is None else u.detach()

    def _fd_shift(self, direction: Sequence[Tensor]) -> tuple[Tensor, float] | None:
        """``(l(theta + h d), h)`` with ``h = fd_eps * max(|theta|, 1) / |d|``; ``None`` when ``d = 0``."""
        d_norm = _norm(direction)
        if d_norm == 0.0:
            return None
        theta = [p.detach() for p in self._params]
        moved = _norm([t * (d != 0) for t, d in zip(theta, direction)]) if self.fd_scale == "moved" else None
        if moved is None and self.module not in _MOVED_SHARE_CHECKED:
            _MOVED_SHARE_CHECKED.add(self.module)
            _check_moved_share(theta, direction)
        h = self.fd_eps * max(_norm(theta) if moved is None else moved, 1.0) / d_norm
        with self._forked(), self._full_fp32(), torch.no_grad():
            return self.train_losses_at([t + h * d.to(t.dtype) for t, d in zip(theta, direction)]), h

    def _fd_finish(self, shift: tuple[Tensor, float] | None) -> Tensor:
        """``(l(theta + h d) - l(theta)) / h``, reusing the training forward's ``l(theta)`` when it can."""
        base = self.detached_losses()
        if shift is None:
            return torch.zeros_like(base)
        shifted, h = shift
        return (shifted - base) / h

    def alignment_at_lr(self, lr: float) -> Tensor:
        """:meth:`alignment` times ``lr``; ``"second_order"`` takes the virtual step with size ``lr``."""
        if self.hypergrad != "second_order":
            return lr * self.alignment()
        eps_holder: list[Tensor] = []

        def weights_of(losses: Tensor) -> Tensor:
            eps_holder.append(torch.zeros_like(losses, requires_grad=True))
            return eps_holder[0]

        (grad_eps,) = self.virtual_step_gradient(weights_of, lambda: eps_holder, lr=lr)
        return -grad_eps

    def alignment(self) -> Tensor:
        """L2RW's ``u_i = <grad l_i(theta), grad L_meta(theta)>`` for every training sample, shape (B,).

        ``"second_order"`` takes the textbook route: ``-d L_meta(theta - grad sum eps_i l_i) / d eps_i`` at
        ``eps = 0`` (virtual step size 1; the step size only scales ``u``). The fast routes use the meta
        gradient averaged across processes (under DDP the meta batch is the union of the ranks' meta batches);
        ``"second_order"`` uses this process's meta batch.
        """
        if self._prepared:
            return self._fd_finish(self._early) if self.hypergrad == "finite_diff" else self._early
        if self.hypergrad == "second_order":
            return self.alignment_at_lr(1.0)
        return self.directional(self._scaled(self.meta_gradient(reduce=True)))

    def lookahead_alignment(self, weights: Tensor, lr: float, step_gradient: Sequence[Tensor | None] | None = None
                            ) -> Tensor:
        """MW-Net's ``G_i = <grad l_i(theta), grad L_meta(theta')>``, ``theta' = theta - lr grad sum w_i l_i``.

        With ``"forward"``, ``sum_i G_i dw_i/dphi * (-lr)`` is the exact meta gradient of
        ``L_meta(theta'(phi))``; ``"finite_diff"`` approximates only the directional derivative.
        ``step_gradient``: ``grad sum w_i l_i`` when it is already known (the real step's gradient, for a
        delayed meta step), which saves the virtual step's backward pass; ``None`` differentiates it here.
        """
        if step_gradient is None:
            virtual = self.virtual_params(weights, lr)
        else:
            steps = self._scaled([torch.zeros_like(t) if g is None else g.detach().to(t.dtype)
                                  for t, g in zip(self._params, step_gradient)])
            virtual = [t.detach() - lr * g for t, g in zip(self._params, steps)]
        return self.directional(self._scaled(self.meta_gradient(virtual)))

    def virtual_step_gradient(
        self, weights_of: Callable[[Tensor], Tensor], wrt: Callable[[], Sequence[Tensor]], lr: float
    ) -> list[Tensor]:
        """The reference: ``d L_meta(theta - lr grad_theta sum_i w_i l_i(theta)) / d wrt`` by double backward.

        Args:
            weights_of: maps the (graph-carrying) training losses to weights ``w`` with a graph to ``wrt``.
            wrt: returns the tensors to differentiate with respect to (called after ``weights_of``).
            lr: the virtual step size.

        Returns:
            The gradients (this process's; the caller averages what must agree across processes).
        """
        with self._forked(), torch.enable_grad():
            p = [t.detach().clone().requires_grad_(True) for t in self._params]
            losses = self.train_losses_at(p)
            w = _at_least_fp32(weights_of(losses.detach()))
            grads = torch.autograd.grad((w * losses).sum(), p, create_graph=True, allow_unused=True)
            steps = self._scaled([torch.zeros_like(t) if g is None else g for t, g in zip(p, grads)])
            virtual = [t - lr * g for t, g in zip(p, steps)]
            meta = self.meta_loss_at(virtual)
            targets = list(wrt())
            out = torch.autograd.grad(meta, targets, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(targets, out)]
