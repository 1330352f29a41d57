"""The two-stage ABSGD recipe: plain ERM until an epoch, then the attentional DRO loss with a lam schedule."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_reweight.callbacks._schedule import warn_if_never_reached
from lightning_reweight.losses.absgd import AttentionalDROLoss

__all__ = ["DROSchedule"]


class DROSchedule(Callback):
    """Set the ``lam`` of every :class:`~lightning_reweight.losses.AttentionalDROLoss` in the module by epoch.

    Before ``start_epoch`` the loss is plain ERM (``lam = None``); from ``start_epoch`` on it is ``lam``, or the
    value of the latest ``lam_schedule`` entry whose epoch is ``<= current_epoch`` (e.g. ``{0: 5.0, 40: 3.0}``
    with ``start_epoch=20`` is ERM for epochs 0-19, 5 for 20-39, 3 from 40). The value depends only on the
    epoch, so a resumed run sets the same ``lam`` as an uninterrupted one; the loss keeps its ``u`` (a buffer)
    across the checkpoint and re-initialises it from the next batch whenever ``lam`` changes.

    Logs ``absgd/lam`` (NaN during ERM) for every epoch (at its first batch).

    Args:
        start_epoch: first epoch of the DRO stage (0: from the start).
        lam: the DRO temperature of that stage (non-zero; negative for label noise). ``None`` (default): the
            ``lam`` the loss was built with (``AttentionalDROLoss(lam=-3.0)`` + ``DROSchedule(start_epoch=5)`` is
            ERM, then ``-3``; the loss's ``built_lam``, which the schedule does not change), or the one of the run
            a checkpoint resumes; a loss built with ``lam=None`` otherwise needs it here. An explicit ``lam`` of
            the other sign than the loss's own is used, with a warning (the sign chooses between hard-sample focus
            and label-noise robustness).
        lam_schedule: optional ``{epoch: lam}`` overrides from those epochs on (epochs ``>= start_epoch``).

    Example:
        >>> cb = DROSchedule(start_epoch=20, lam=5.0, lam_schedule={40: 3.0})
        >>> [cb.lam_at(e) for e in (0, 19, 20, 39, 40)]
        [None, None, 5.0, 5.0, 3.0]
    """

    def __init__(
        self, start_epoch: int = 0, lam: float | None = None, lam_schedule: dict[int, float] | None = None
    ) -> None:
        super().__init__()
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        values = [*([] if lam is None else [lam]), *(lam_schedule or {}).values()]
        if any(v is None or not math.isfinite(float(v)) or float(v) == 0.0 for v in values):
            raise ValueError(f"lam and the lam_schedule values must be finite non-zero numbers, got {values}")
        early = [e for e in (lam_schedule or {}) if int(e) < start_epoch]
        if early:
            raise ValueError(f"lam_schedule epochs {early} come before start_epoch={start_epoch}; remove them")
        self._start_epoch = int(start_epoch)
        self._lam_given = lam is not None
        self._lam: float | None = None if lam is None else float(lam)
        self._schedule = {int(e): float(v) for e, v in sorted((lam_schedule or {}).items())}
        self._losses: list[AttentionalDROLoss] = []
        self._current: float | None = None
        self._warned_sign = False
        self._logged_epoch: tuple[int, int] | None = None  # (epoch, trainer) absgd/lam was last logged for

    def lam_at(self, epoch: int) -> float | None:
        """The ``lam`` used during ``epoch`` (``None``: plain ERM).

        Raises:
            RuntimeError: for an epoch of the DRO stage while ``lam`` is still to be taken from the loss (before
                the callback's ``setup``).
        """
        if epoch < self._start_epoch:
            return None
        lam = self._lam
        if lam is None:
            raise RuntimeError("DROSchedule(lam=None) takes the loss's lam in setup; it is not known yet")
        for e, v in self._schedule.items():
            if e <= epoch:
                lam = v
        return lam

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._losses = [m for m in pl_module.modules() if isinstance(m, AttentionalDROLoss)]
        if stage != "fit":
            return
        if not self._losses:
            raise ValueError(
                "DROSchedule found no AttentionalDROLoss in the LightningModule: pass one as the criterion, e.g. "
                "ReweightClassifier(backbone, num_classes, criterion=AttentionalDROLoss(lam=-1.0)), or keep it as "
                "an attribute (submodule) of your module"
            )
        if not self._lam_given:  # the losses' own lam, as built (a schedule changes .lam), at every fit
            built = {loss.built_lam for loss in self._losses}
            self._lam = built.pop() if len(built) == 1 and None not in built else None
        elif not self._warned_sign:
            lam = self._lam
            assert lam is not None  # _lam_given: lam was given (not None)
            flipped = sorted(
                v for v in (loss.built_lam for loss in self._losses) if v is not None and (v > 0) != (lam > 0)
            )
            if flipped:
                self._warned_sign = True
                rank_zero_warn(
                    f"DROSchedule(lam={self._lam}) replaces the AttentionalDROLoss's own lam {flipped[0]}, of the "
                    "other sign (lam > 0 focuses on hard samples, lam < 0 down-weights them, for label noise); pass "
                    "DROSchedule(lam=None) to use the loss's"
                )

    def _apply(self, trainer: Trainer) -> None:
        self._current = self.lam_at(trainer.current_epoch)
        for loss in self._losses:
            loss.lam = self._current

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._lam is None:  # after a checkpoint's restore, which brings the resolved lam of the run it resumes
            built = sorted({str(loss.built_lam) for loss in self._losses})
            raise ValueError(
                f"DROSchedule(lam=None) uses the lam the AttentionalDROLoss was built with, but the losses were built "
                f"with lam {built}: pass the DRO stage's temperature, DROSchedule(lam=...)"
            )
        warn_if_never_reached(trainer, self._start_epoch, "DROSchedule")
        self._apply(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply(trainer)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # logged at an epoch's first batch, not its start: Lightning skips the epoch-start hook of the epoch a run
        # resumes into (a checkpoint from an epoch's last batch or its middle), which then had no absgd/lam
        if self._logged_epoch == (trainer.current_epoch, id(trainer)):
            return
        self._logged_epoch = (trainer.current_epoch, id(trainer))
        lam = float("nan") if self._current is None else self._current
        # the same on every rank: the max is the value itself, and Lightning does not ask for sync_dist under DDP
        pl_module.log("absgd/lam", lam, on_epoch=True, on_step=False, batch_size=1, sync_dist=True, reduce_fx="max")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start_epoch": self._start_epoch, "lam": self._lam, "lam_schedule": dict(self._schedule),
                "current": self._current}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._current = state_dict.get("current")
        if self._lam is None and state_dict.get("lam") is not None:  # the resolved lam of the checkpointed run
            self._lam = float(state_dict["lam"])

    def benchmark_metrics(self) -> dict[str, Any]:
        """What the benchmark runner records for this callback: the schedule."""
        return {"dro_start_epoch": self._start_epoch, "dro_lam": self._lam, "dro_lam_schedule": dict(self._schedule)}
