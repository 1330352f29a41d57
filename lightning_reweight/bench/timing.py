"""A callback that times training steps (batch start to batch end, the method's own work included)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["StepTimer"]


class StepTimer(Callback):
    """Record the wall time of every training step after ``skip_epochs`` warm-up epochs.

    Put it first in the callback list so that its start hook runs before, and its end hook runs before the
    other callbacks' end hooks: the time then covers the other callbacks' ``on_train_batch_start`` work, the
    training step, the backward pass and the optimizer step.

    Example:
        >>> timer = StepTimer(skip_epochs=0)
        >>> timer.median_ms is None
        True
    """

    def __init__(self, skip_epochs: int = 1) -> None:
        self.skip_epochs = skip_epochs
        self.times: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter() if trainer.current_epoch >= self.skip_epochs else None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)

    @property
    def median_ms(self) -> float | None:
        """Median step time in milliseconds (``None`` before any timed step)."""
        return 1000.0 * statistics.median(self.times) if self.times else None
