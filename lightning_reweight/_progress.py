"""Lightning's loop state as the training data needs it (the epoch a loader draws for; sharding across processes)."""

from __future__ import annotations

from typing import Any


def fit_epoch(trainer: Any, training_started: bool) -> int:
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


def shards_training_data(trainer: Any) -> bool:
    """Whether Lightning would shard the training loader across processes (a ``DistributedSampler``)."""
    return (
        trainer is not None
        and trainer.world_size > 1
        and trainer.distributed_sampler_kwargs is not None
        and getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
    )
