"""Where callbacks find the training set."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def train_dataset(trainer: Trainer) -> Any | None:
    """``trainer.datamodule.train_dataset``, else the train loader's ``dataset``, else ``None``."""
    dm = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime by Lightning
    dataset = getattr(dm, "train_dataset", None) if dm is not None else None
    if dataset is None:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
    return dataset


def starts_new_run(trainer: Trainer) -> bool:
    """Whether ``setup("fit")`` begins a new run: no step or epoch done yet (a resumed checkpoint loads after it)."""
    return trainer.global_step == 0 and trainer.current_epoch == 0


def loader_uses_sampler(loader: Any, sampler: Any) -> bool:
    """Whether ``sampler`` drives ``loader`` (directly, in its batch sampler, or inside a distributed wrapper)."""
    seen: set[int] = set()
    frontier = [loader]
    for _ in range(5):  # loader -> batch_sampler -> DistributedSamplerWrapper -> its dataset -> the sampler
        found = []
        for obj in frontier:
            if obj is sampler:
                return True
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            found += [getattr(obj, name, None) for name in ("sampler", "batch_sampler", "_sampler", "dataset")]
        frontier = [o for o in found if o is not None]
    return False
