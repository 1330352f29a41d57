"""Checks shared by the epoch-scheduled callbacks (DRW, DRS, the DRO schedule)."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn


def warn_if_never_reached(trainer: Trainer, start_epoch: int, what: str, argument: str = "start_epoch") -> None:
    """Warn when ``start_epoch`` lies beyond the run's last epoch: the scheduled stage would silently never start."""
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and start_epoch >= max_epochs:
        rank_zero_warn(
            f"{what}: {argument}={start_epoch} is never reached with max_epochs={max_epochs} (epochs "
            f"0-{max_epochs - 1}), so the whole run trains without it; lower {argument} or raise max_epochs"
        )
