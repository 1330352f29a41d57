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


def fit_epoch(trainer: Trainer, training_started: bool) -> int:
    """The epoch whose batches the training loader draws next (or draws now).

    Once ``on_train_start`` has run (``training_started``) that is ``trainer.current_epoch``. Before it, a loader
    with workers already draws its first indices (Lightning builds the first iterator of a fit before it restores
    its epoch counters from a checkpoint, let alone ``current_epoch``), so the epoch comes from Lightning's
    progress as the checkpoint left it: the processed epochs, plus one when the checkpoint was taken at an epoch's
    last batch (that epoch is over, though not yet counted as processed).
    """
    if training_started:
        return int(trainer.current_epoch)
    loop = getattr(trainer, "fit_loop", None)
    progress = getattr(getattr(loop, "epoch_progress", None), "current", None)
    if progress is None:
        return int(trainer.current_epoch)
    batches = getattr(getattr(loop, "epoch_loop", None), "batch_progress", None)
    last_batch_done = (
        progress.processed == progress.completed
        and progress.started > progress.processed
        and bool(getattr(batches, "is_last_batch", False))
    )
    return int(progress.processed) + int(last_batch_done)


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
