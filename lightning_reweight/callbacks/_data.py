"""Where callbacks find the training set."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def train_dataset(trainer: Trainer) -> Any | None:
    """``trainer.datamodule.train_dataset``, else the train loader's ``dataset``, else ``None``."""
    dm = trainer.datamodule
    dataset = getattr(dm, "train_dataset", None) if dm is not None else None
    if dataset is None:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
    return dataset


def starts_new_run(trainer: Trainer) -> bool:
    """Whether ``setup("fit")`` begins a new run: no step or epoch done yet (a resumed checkpoint loads after it)."""
    return trainer.global_step == 0 and trainer.current_epoch == 0
