"""Checks shared by the epoch-scheduled callbacks (DRW, DRS, the DRO schedule, the meta warm-up)."""

from __future__ import annotations

import math

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn


def last_epoch(trainer: Trainer) -> tuple[int, str] | None:
    """The index of the run's last epoch and the Trainer limit that sets it (``None`` when no limit is known).

    ``max_epochs`` gives ``max_epochs - 1``; ``max_steps`` (automatic optimization, epochs of known length) gives
    the epoch in which the ``max_steps``-th optimizer step falls, with ``ceil(batches / accumulate_grad_batches)``
    steps per epoch. Call it from ``on_train_start`` or later (the epoch length is known from then on).
    """
    limits = []
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0:
        limits.append((max_epochs - 1, f"max_epochs={max_epochs}"))
    max_steps, batches = trainer.max_steps, trainer.num_training_batches
    module = trainer.lightning_module
    automatic = module is None or module.automatic_optimization
    if max_steps is not None and max_steps > 0 and automatic and isinstance(batches, int) and batches > 0:
        per_epoch = math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1))
        limits.append(((max_steps - 1) // per_epoch, f"max_steps={max_steps} ({per_epoch} steps per epoch)"))
    return min(limits) if limits else None


def warn_if_never_reached(trainer: Trainer, start_epoch: int, what: str, argument: str = "start_epoch") -> None:
    """Warn when ``start_epoch`` lies beyond the run's last epoch: the scheduled stage would silently never start."""
    last = last_epoch(trainer)
    if last is not None and start_epoch > last[0]:
        rank_zero_warn(
            f"{what}: {argument}={start_epoch} is never reached with {last[1]} (epochs 0-{last[0]}), so the whole "
            f"run trains without it; lower {argument} or raise {last[1].split('=')[0]}"
        )
