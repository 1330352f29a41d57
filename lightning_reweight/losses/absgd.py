"""ABSGD's attentional DRO loss (Qi et al., TMLR 2023): a moving-average normalised softmax of the losses."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_reweight.contract import WeightingContext, check_per_sample_losses
from lightning_reweight.functional.dro import log_mean_exp
from lightning_reweight.loggers import step_logs_written
from lightning_reweight.losses._fp32 import Float32Buffers

__all__ = ["AttentionalDROLoss"]


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (what a float32 buffer holding it reads back as)."""
    return struct.unpack("f", struct.pack("f", value))[0]


class AttentionalDROLoss(Float32Buffers):
    r"""Attentional-biased loss of ABSGD: ``sum_i p_i l_i`` with ``p_i = exp(l_i / lam) / (u * B)`` (detached).

    ``u`` is a moving average of the batch statistic ``mean(exp(l / lam))``::

        u <- (1 - gamma) * u + gamma * alpha * mean(exp(l / lam))

    updated once per training step, **before** the weights of that step are computed; with ``gamma = 1`` and
    ``alpha = 1`` the weights are exactly ``softmax(l / lam)``. ``lam > 0`` focuses on hard samples (class
    imbalance); ``lam < 0`` down-weights high-loss samples (label noise); ``lam = None`` is plain ERM (uniform
    weights; a training step ends ``u``'s run, see below). ``alpha`` scales the normaliser (``sum p ~ 1 / alpha``).

    Compared with the reference code: ``u`` is kept as ``log u`` in an fp32 buffer and updated with
    ``logaddexp`` (no overflow for any finite loss and ``lam != 0``; inputs may be fp32, bf16 or fp16); the
    first update sets ``u`` to the first batch's ``alpha * mean(exp(l / lam))`` instead of starting at 0 (no
    ``1/gamma`` inflation of the first steps); updates use detached values (no graph kept across steps); ``u``
    is saved in checkpoints; under DDP the batch statistic is taken over all ranks, so ``u`` is identical on
    every rank. When ``lam`` changes (e.g. by :class:`~lightning_reweight.callbacks.DROSchedule`), ``u`` is
    re-initialised from the next batch, since ``exp(l / lam)`` changes scale; so it is after a training step with
    ``lam = None`` (an ERM stage ends ``u``'s run, even when the next stage uses the same ``lam``).

    Two ways to use it, both update ``u`` exactly once per training step:

    * as a criterion: ``loss = criterion(logits, targets)`` returns the scalar ``sum_i p_i l_i``;
    * through the reweighting contract: it is a :class:`~lightning_reweight.contract.SampleWeighting` with a
      ``base_loss``, so ``ReweightClassifier(criterion=AttentionalDROLoss(...))`` computes per-sample losses with
      ``base_loss`` and calls :meth:`sample_weights` (mean-scale weights ``B * p_i``); it then also logs
      ``absgd/dro_objective`` (``lam * log mean exp(l / lam)`` of the batch) and ``absgd/log_u`` every
      ``log_every_n_steps`` steps.

    ``u`` is only updated in training mode (``module.train()``); in eval mode the current ``u`` is used as is
    (the batch's own statistic when ``u`` has not started for this ``lam``, or with ``gamma = 1``). A training
    batch whose statistic is not finite (an ``inf`` or ``nan`` loss, e.g. an fp16 overflow that the GradScaler
    will skip) leaves ``u`` unchanged.

    Args:
        lam: the DRO temperature (non-zero), or ``None`` for plain ERM.
        gamma: weight of the new batch in the moving average, in ``(0, 1]`` (1: no memory).
        alpha: scale of the normaliser, ``> 0``.
        base_loss: per-sample loss on ``(logits, targets)`` with ``reduction="none"`` (default cross-entropy).
            Class weights (``nn.CrossEntropyLoss(weight=...)``, ``LDAMLoss(weight=...)``) multiply the loss inside
            the exponential, as in the paper's recipes.
        sync_dist: take the batch statistic over all DDP ranks when ``torch.distributed`` is initialised. Keep
            it on under Lightning's DDP: with ``sync_dist=False`` DDP's buffer broadcast resets every rank's ``u``
            to rank 0's before each step (a warning says so).

    Example:
        >>> import torch
        >>> criterion = AttentionalDROLoss(lam=1.0, gamma=1.0)
        >>> logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
        >>> l = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        >>> torch.allclose(criterion(logits, targets), (torch.softmax(l, 0) * l).sum())
        True
    """

    log_u: Tensor
    initialised: Tensor
    u_lam: Tensor

    def __init__(
        self,
        lam: float | None = 1.0,
        gamma: float = 0.9,
        alpha: float = 1.0,
        base_loss: nn.Module | None = None,
        sync_dist: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in (0, 1] (the weight of the new batch), got {gamma}")
        if not (alpha > 0.0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive number, got {alpha}")
        self.lam = lam
        #: the ``lam`` given to the constructor (schedules change :attr:`lam`; ``DROSchedule(lam=None)`` reads this)
        self.built_lam: float | None = self.lam
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.sync_dist = sync_dist
        self.base_loss = base_loss if base_loss is not None else nn.CrossEntropyLoss(reduction="none")
        reduction = getattr(self.base_loss, "reduction", "none")
        if reduction != "none":
            raise ValueError(f"base_loss has reduction={reduction!r}; construct it with reduction='none'")
        self.register_buffer("log_u", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # the lam that u was accumulated with (NaN: none yet); a different lam re-initialises u
        self.register_buffer("u_lam", torch.full((), math.nan, dtype=torch.float32))
        self._last: tuple[Tensor, float, float] | None = None
        self._const_key: tuple[Any, ...] | None = None
        self._const: tuple[Tensor, ...] = ()
        self._u_lam: float | None = None
        self._warned_local = False

    # ------------------------------------------------------------------ hyperparameters
    @property
    def lam(self) -> float | None:
        """The DRO temperature (``None``: plain ERM)."""
        return self._lam

    @lam.setter
    def lam(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value == 0.0 or not math.isfinite(value):
                raise ValueError(f"lam must be a finite non-zero number or None (plain ERM), got {value}")
        self._lam = value
        # u_lam is a float32 buffer: the step compares the value it can hold (rounded here, not in the step,
        # which torch.compile traces)
        self._lam32 = None if value is None else _as_float32(value)

    @property
    def u(self) -> Tensor:
        """The moving average ``u`` (``exp(log_u)``; may overflow to ``inf`` for large ``l / lam``)."""
        return self.log_u.exp()

    def extra_repr(self) -> str:
        return f"lam={self.lam}, gamma={self.gamma}, alpha={self.alpha}"

    # ------------------------------------------------------------------ the maths
    def _log_weights(self, losses: Tensor, update: bool) -> Tensor:
        """``log(B * p_i) = l_i / lam - log u`` (fp32, detached); updates ``u`` when ``update``.

        The hot path is a handful of tensor ops and no host-device synchronisation: whether ``u`` must be
        (re-)initialised is known on the host (``_u_lam``, mirrored from the buffers when a state dict loads).
        """
        lam = self.lam
        assert lam is not None
        if losses.numel() == 0:
            raise ValueError("AttentionalDROLoss got an empty batch: its weights softmax(l / lam) need a sample")
        with torch.no_grad():
            dist = torch.distributed
            in_group = dist.is_available() and dist.is_initialized()
            distributed = update and self.sync_dist and in_group
            if update and in_group and not self.sync_dist and not self._warned_local:
                self._warned_local = True
                rank_zero_warn(
                    "AttentionalDROLoss(sync_dist=False) under DDP: Lightning's DDP broadcasts the module's buffers "
                    "from rank 0 before every forward (broadcast_buffers=True), so each rank's u restarts from "
                    "rank 0's at every step: u is neither per rank nor global. Keep sync_dist=True (u over all "
                    "ranks' batches, identical everywhere)"
                )
            n = 1 if distributed else losses.numel()  # log_mean_exp already divides by the global count
            inv_lam, c_fresh, c_decay, c_new = self._constants(lam, n, losses.device)
            z = losses.float() * inv_lam
            if distributed:
                lse = log_mean_exp(z, distributed=True)  # over every rank's batch: identical on all ranks
            else:
                m = z.amax()
                lse = (z - m).exp_().sum().log_().add_(m)  # logsumexp, in fewer kernels than torch.logsumexp
            # the batch statistic log mean exp(l / lam) is lse - log n
            lam32 = self._lam32
            fresh = self._u_lam != lam32
            if fresh or self.gamma == 1.0:  # u starts (again) from this batch; gamma = 1: u is the batch's alone
                log_u = lse + c_fresh
            elif update:
                log_u = torch.logaddexp(self.log_u + c_decay, lse + c_new)
            else:  # eval mode: the current u, as is
                log_u = self.log_u
            if update:
                if not fresh:  # a non-finite batch (an inf/nan loss) leaves u as it was (no host sync)
                    self.log_u.copy_(torch.where(lse.isfinite(), log_u, self.log_u))
                elif bool(lse.isfinite()):  # one host sync, only when u (re)starts
                    self.log_u.copy_(log_u)
                    self.initialised.fill_(True)
                    self.u_lam.fill_(lam)
                    self._u_lam = lam32
                self._last = (lse, math.log(n), lam)
            return z - log_u

    def _constants(self, lam: float, n: int, device: torch.device) -> tuple[Tensor, ...]:
        # scalar tensors cached per (lam, n, device): python-float operands would be converted on every step
        key = (lam, n, device, self.gamma, self.alpha)
        if self._const_key != key:
            g, a, log_n = self.gamma, self.alpha, math.log(n)
            values = (1.0 / lam, math.log(a) - log_n, math.log1p(-g) if g < 1 else 0.0, math.log(g * a) - log_n)
            self._const = tuple(torch.tensor(v, dtype=torch.float32, device=device) for v in values)
            self._const_key = key
        return self._const

    @property
    def last_objective(self) -> Tensor | None:
        """The DRO objective ``lam * log mean exp(l / lam)`` of the last training batch (detached fp32)."""
        if self._last is None:
            return None
        lse, log_n, lam = self._last
        return (lse - log_n) * lam

    def _erm_step(self) -> None:
        """A training step with ``lam = None`` ends ``u``'s run: a later DRO stage starts it afresh.

        Without this, ``lam -> None -> lam`` (a second fit of a module whose first fit ended in the DRO stage, or a
        checkpoint fine-tuned with an ERM warm-up) would carry the old ``u`` into the new stage, and its first
        weights would be scaled by the ratio of the old statistic to the new one. Marked in the buffers, so a
        checkpoint taken after ERM steps resumes into a fresh start too.
        """
        if self.training and self._u_lam is not None:
            self.initialised.fill_(False)
            self.u_lam.fill_(math.nan)
            self._u_lam = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_host_state()

    def _sync_host_state(self) -> None:
        # the lam that u belongs to, on the host (None: u not initialised); read once per state-dict load
        self._u_lam = float(self.u_lam) if bool(self.initialised) and not bool(self.u_lam.isnan()) else None

    def sample_weights(self, losses: Tensor, context: WeightingContext | None = None) -> Tensor:
        """Mean-scale weights ``B * p_i = exp(l_i / lam) / u`` (detached, fp32); updates ``u`` in training mode.

        Args:
            losses: per-sample losses, shape ``(B,)``.
            context: the contract's context; when it carries a module with a trainer, the DRO objective and
                ``log u`` are logged every ``log_every_n_steps`` steps.

        Returns:
            Weights of shape ``(B,)``; ones when ``lam`` is ``None``.
        """
        check_per_sample_losses(losses)
        if self.lam is None:
            self._erm_step()
            return torch.ones_like(losses, dtype=torch.float32).detach()
        weights = self._log_weights(losses, update=self.training).exp_()
        if self.training and context is not None:
            self._log(context.module)
        return weights

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The attentional loss ``sum_i p_i l_i`` of the base loss's per-sample values (fp32 scalar)."""
        if targets.dim() == 0:  # one sample without a batch dimension (class-index or probability targets are (B, ...))
            raise ValueError(
                f"AttentionalDROLoss takes a batch: targets of shape (B,) (class indices) or (B, C) (probabilities), "
                f"got a 0-d target with logits of shape {tuple(logits.shape)}"
            )
        losses = check_per_sample_losses(self.base_loss(logits, targets), targets.shape[0])
        if self.lam is None:
            self._erm_step()
            return losses.float().mean()
        return (self.sample_weights(losses) * losses.float()).mean()

    def _log(self, module: Any) -> None:
        trainer = getattr(module, "_trainer", None)
        if trainer is None or not hasattr(module, "log") or self._last is None:
            return
        if not step_logs_written(trainer):
            return
        module.log_dict(
            {"absgd/dro_objective": self.last_objective, "absgd/log_u": self.log_u.clone()},
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )
