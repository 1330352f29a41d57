"""An unfinished epoch's records in a checkpoint, per rank: gathered from every rank at save, each rank's own at load.

Lightning writes rank 0's callback state only. An epoch's records (the weights seen for an AUROC, subset counts)
differ between ranks, so the callbacks gather them first (a collective: Lightning dumps a checkpoint on every
rank) and each rank takes its own back when the run resumes with the same number of processes, so the epoch's
end values are those of the uninterrupted run. With another number of processes, rank 0 takes every saved rank's
records merged (an epoch whose batches were all done then still ends with exact values) and the other ranks an
empty copy of the same structure (the end-of-epoch reductions are collectives every rank must join).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Records = dict[str, Any]

__all__ = ["cat_or_none", "collective_world", "gather_records", "records_for_rank"]


def collective_world(trainer: Any) -> int:
    """The number of processes a checkpoint's state gathers from: the world size under DDP, else 1.

    Lightning dumps a checkpoint on every rank (``ModelCheckpoint`` during the run, ``trainer.save_checkpoint``
    after it), so a state dict may gather: it is a collective, to be called on every rank. Not after an exception
    (``OnExceptionCheckpoint`` runs on the failing rank alone): this rank's state alone then.
    """
    if trainer is None or trainer.world_size <= 1 or getattr(trainer, "interrupted", False):
        return 1
    return trainer.world_size if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def gather_records(trainer: Any, records: Records | None) -> Records | None:
    """``{"per_rank": [records of rank 0, 1, ...]}`` under DDP (a collective), else ``records`` itself."""
    world = collective_world(trainer)
    if world <= 1:
        return records
    gathered: list[Records | None] = [None] * world
    torch.distributed.all_gather_object(gathered, records)
    return None if all(r is None for r in gathered) else {"per_rank": gathered}


def records_for_rank(
    saved: Records | None,
    rank: int,
    world: int,
    merge: Callable[[list[Records]], Records],
    empty: Callable[[Records], Records],
) -> Records | None:
    """This rank's records out of a checkpoint's (:func:`gather_records`'s output, or one process's records).

    Args:
        saved: what the checkpoint holds.
        rank: this process's global rank.
        world: the number of processes now.
        merge: several ranks' records as one process's.
        empty: a copy of records holding no sample (same keys, same epoch).
    """
    if saved is None:
        return None
    per_rank = saved.get("per_rank", [saved])
    present = [r for r in per_rank if r is not None]
    if not present:
        return None
    if len(per_rank) == world:
        own = per_rank[rank]
        return own if own is not None else empty(present[0])
    if rank > 0:
        return empty(present[0])
    return present[0] if len(present) == 1 else merge(present)


def cat_or_none(parts: list[Any]) -> torch.Tensor | None:
    """The concatenation of the parts that are not ``None`` (``None`` when none is a tensor)."""
    tensors = [torch.as_tensor(p) for p in parts if p is not None]
    return torch.cat(tensors) if tensors else None

