"""A training sampler that shuffles until an epoch, then draws by per-sample weights (used by DRS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from numbers import Integral

import torch
from torch import Tensor
from torch import distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["DeferredWeightedSampler"]


class DeferredWeightedSampler(DistributedSampler):
    """Shuffle before ``start_epoch``; from it on, draw with replacement proportionally to ``weights``.

    Every epoch draws ``num_samples`` indices from a generator seeded with ``seed + epoch``, so all DDP ranks
    build the same list, and a run resumed from an epoch's end (or its last batch) draws what the uninterrupted run
    drew. With ``num_replicas > 1`` each rank yields its share of that list (every ``num_replicas``-th index from
    ``rank``, the list padded by its start to a multiple, as ``DistributedSampler`` does); being a
    ``DistributedSampler``, Lightning then leaves it in place instead of wrapping it in a sampler that reshuffles
    each share with ``seed_everything``'s seed and an epoch of its own. A run resumed mid-epoch
    draws that epoch's list from its start again: Lightning restarts a loader that cannot save its position.

    The epoch is read when the indices are drawn: from ``epoch_source()`` when given, else from the value passed to
    :meth:`set_epoch`. Lightning creates the first epoch's loader iterator (a loader with workers draws indices
    right then) before it calls ``set_epoch``, and on a resume before it restores its epoch counters, so a callback
    should pass an ``epoch_source`` that reads Lightning's progress as the checkpoint left it until
    ``on_train_start`` and ``trainer.current_epoch`` from then on; ``DeferredResampling`` does.

    Args:
        num_samples: the dataset size (indices drawn per epoch).
        weights: per-sample weights used from ``start_epoch`` on, shape ``(num_samples,)``; ``None``: always shuffle.
        start_epoch: first epoch that samples by ``weights``.
        seed: base seed of the per-epoch generator.
        epoch_source: optional callable returning the current epoch.
        num_replicas: processes sharing the list (DDP world size); ``None``: the initialised process group's, else 1.
        rank: this process's rank among them; ``None``: the process group's, else 0.

    Example:
        >>> import torch
        >>> s = DeferredWeightedSampler(4, weights=torch.tensor([0.0, 0.0, 0.0, 1.0]), start_epoch=1)
        >>> sorted(s)  # epoch 0: a permutation
        [0, 1, 2, 3]
        >>> s.set_epoch(1)
        >>> list(s)
        [3, 3, 3, 3]
    """

    def __init__(
        self,
        num_samples: int,
        weights: Tensor | None = None,
        start_epoch: int = 0,
        seed: int = 0,
        epoch_source: Callable[[], int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        # no DistributedSampler.__init__ (it wants a dataset and a process group): the type is what Lightning reads
        if isinstance(num_samples, bool) or not isinstance(num_samples, Integral):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__} ({num_samples!r})")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_replicas is not None and rank is not None and (num_replicas < 1 or not 0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
            if weights.shape != (num_samples,):
                raise ValueError(f"weights must have shape ({num_samples},), got {tuple(weights.shape)}")
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
                raise ValueError("weights must be finite and non-negative with a positive sum")
        self.num_samples = int(num_samples)
        self.weights: Tensor | None = weights
        self.start_epoch: int = int(start_epoch)
        self.seed: int = int(seed)
        self.epoch: int = 0
        self.epoch_source: Callable[[], int] | None = epoch_source
        self._num_replicas: int | None = num_replicas
        self._rank: int | None = rank
        self.shuffle = True
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (Lightning calls this on a loader's sampler); ``epoch_source`` takes precedence."""
        self.epoch = int(epoch)

    def current_epoch(self) -> int:
        """The epoch the next iteration draws for."""
        return int(self.epoch_source()) if self.epoch_source is not None else self.epoch

    def is_weighted(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) samples by the weights."""
        epoch = self.current_epoch() if epoch is None else epoch
        return self.weights is not None and epoch >= self.start_epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self.current_epoch()
        g = torch.Generator().manual_seed(self.seed + epoch)
        if self.is_weighted(epoch):
            assert self.weights is not None
            idx = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=g)
        else:
            idx = torch.randperm(self.num_samples, generator=g)
        replicas, rank = self.num_replicas, self.rank
        if replicas > 1:  # this rank's share of the list all ranks drew, padded by repeating it to a multiple
            total = len(self) * replicas
            idx = idx.repeat(-(-total // self.num_samples))[:total][rank:total:replicas]
        return iter(idx.tolist())

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        """Processes sharing the list: as given, else the initialised process group's size, else 1."""
        if self._num_replicas is not None:
            return int(self._num_replicas)
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank among them: as given, else the process group's, else 0."""
        if self._rank is not None:
            return int(self._rank)
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def __len__(self) -> int:
        return -(-self.num_samples // self.num_replicas)  # ceil: every rank the same number of indices
