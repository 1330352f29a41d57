"""The shared reweighting data pipeline: validation, meta, long-tail and noisy training splits."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sized
from typing import Any, Literal, cast

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from lightning_reweight._progress import fit_epoch, shards_training_data
from lightning_reweight.data._checks import as_labels, check_choice, check_int, check_real, generator
from lightning_reweight.data.indexed import IndexedDataset, RelabeledSubset
from lightning_reweight.data.longtail import IMBALANCE_PROFILES, class_counts, long_tailed_indices
from lightning_reweight.data.noise import NOISE_KINDS, inject_label_noise
from lightning_reweight.data.split import balanced_meta_split, stratified_split

__all__ = ["ReweightDataModule"]

# Offsets that give each random stage of the pipeline its own stream for a given seed.
_VAL_STREAM, _META_STREAM, _LONGTAIL_STREAM, _NOISE_STREAM, _SHUFFLE_STREAM, _META_SHUFFLE_STREAM = range(6)
_WORKER_SEED_STREAM, _META_WORKER_SEED_STREAM = 6, 7


# What setup() builds (attributes, not properties: subclasses and users may set them).
_SET_BY_SETUP = frozenset({
    "train_dataset", "meta_dataset", "val_dataset", "test_dataset", "train_targets", "clean_train_targets",
    "noise_mask", "train_class_counts", "clean_train_class_counts", "val_indices", "meta_indices", "train_indices",
})


def _stage_seed(seed: int, stream: int) -> int:
    return (seed * 1_000_003 + stream) % (2**63 - 1)


class ReweightDataModule(L.LightningDataModule):
    """Base datamodule: noisy, optionally long-tailed training data plus clean meta, validation and test sets.

    Subclasses only load the raw data, by implementing :meth:`load_train_pool` and :meth:`load_test_set`
    (and optionally setting :attr:`train_transform` / :attr:`eval_transform`). :meth:`setup` then, from the
    training pool and deterministically for ``seed``:

    1. splits off a stratified validation set (``val_fraction``, clean labels);
    2. splits off a clean, class-balanced meta set (``meta_per_class`` per class; 0 means no meta set);
    3. long-tail subsamples the rest (``imbalance_ratio``, ``imbalance_profile``; ``imbalance_ratio=1`` keeps
       everything), leaving the meta, validation and test sets untouched; the head class keeps as many samples
       as the smallest class has left after steps 1-2 (``val_fraction=0, meta_per_class=0`` for the published
       long-tailed sets, e.g. CIFAR-10-LT's 5000 ... 50);
    4. injects label noise (``noise_rate``, ``noise_kind``) into that training part only.

    After :meth:`setup` the module exposes ``num_classes``, ``train_dataset`` (yields ``(x, noisy_y, i)``,
    ``i`` in ``0..len-1``), ``meta_dataset``, ``val_dataset`` and ``test_dataset`` (yield ``(x, y)``),
    ``train_targets`` (noisy), ``clean_train_targets``, ``noise_mask`` (``True`` = noisy, aligned with the
    training indices ``i``), ``train_class_counts`` (of the noisy labels), ``clean_train_class_counts``, and
    ``val_indices`` / ``meta_indices`` / ``train_indices`` (positions in the training pool). Setting
    ``train_sampler`` to a :class:`~torch.utils.data.Sampler` (or ``BatchSampler``) makes
    :meth:`train_dataloader` use it instead of shuffling.

    The meta set uses the training transform (it is training data); validation and test use the evaluation
    transform.

    Args:
        noise_rate: fraction of training labels to corrupt, in ``[0, 1]``.
        noise_kind: ``"symmetric"``, ``"symmetric_all"``, ``"pairflip"`` or ``"cifar10_asymmetric"`` (see
            :func:`~lightning_reweight.data.inject_label_noise`; for a transition matrix, call that function).
        imbalance_ratio: head-to-tail ratio of the training part (``>= 1``; 1 keeps all samples).
        imbalance_profile: ``"exp"`` or ``"step"``.
        meta_per_class: clean meta samples per class (``>= 0``).
        val_fraction: stratified fraction of the pool held out for validation, in ``[0, 1)``.
        batch_size: training batch size.
        meta_batch_size: meta batch size.
        eval_batch_size: validation/test batch size.
        num_workers: dataloader workers.
        pin_memory: page-locked host batches in every loader (faster host-to-GPU copies).
        seed: seed of every random choice of the pipeline and of the training shuffle (under DDP too: the
            training loader then shards with a ``DistributedSampler`` seeded from it, not from
            ``seed_everything``). In one process the shuffled order also depends on whether ``num_workers``
            is 0: without workers the loader first draws its (unused) worker base seed from the shuffle
            generator, as ``DataLoader(shuffle=True, generator=g)`` does, which shifts the permutation; each
            setting is reproducible, and under DDP the order does not depend on ``num_workers``.

    Example:
        >>> from lightning_reweight.data.indexed import TensorClassificationDataset
        >>> class Toy(ReweightDataModule):
        ...     num_classes = 2
        ...     def load_train_pool(self):
        ...         y = torch.arange(2).repeat(50)
        ...         return TensorClassificationDataset(torch.randn(100, 3), y), y
        ...     def load_test_set(self):
        ...         return TensorClassificationDataset(torch.randn(10, 3), torch.arange(2).repeat(5))
        >>> dm = Toy(noise_rate=0.2, meta_per_class=5, val_fraction=0.1)
        >>> dm.setup()
        >>> len(dm.val_dataset), len(dm.meta_dataset), len(dm.train_dataset), int(dm.noise_mask.sum())
        (10, 10, 80, 16)
    """

    #: Number of classes; subclasses set it (otherwise it is inferred from the pool's labels in setup).
    num_classes: int
    #: Transform applied to training and meta inputs (``None`` = identity).
    train_transform: Callable[[Any], Any] | None = None
    #: Transform applied to validation and test inputs (``None`` = identity).
    eval_transform: Callable[[Any], Any] | None = None

    def __init__(
        self,
        noise_rate: float = 0.0,
        noise_kind: Literal["symmetric", "symmetric_all", "pairflip", "cifar10_asymmetric"] = "symmetric",
        imbalance_ratio: float = 1.0,
        imbalance_profile: Literal["exp", "step"] = "exp",
        meta_per_class: int = 10,
        val_fraction: float = 0.1,
        batch_size: int = 100,
        meta_batch_size: int = 100,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.noise_rate = check_real("noise_rate", noise_rate, low=0.0, high=1.0, high_inclusive=True)
        self.noise_kind = check_choice("noise_kind", noise_kind, NOISE_KINDS)
        known = getattr(type(self), "num_classes", None)  # a subclass's class attribute, when it has one
        if noise_kind == "cifar10_asymmetric" and isinstance(known, int) and known != 10:
            raise ValueError(
                f"noise_kind='cifar10_asymmetric' is the CIFAR-10 convention (10 classes), but {type(self).__name__} "
                f"has {known} classes: pick 'symmetric', 'symmetric_all' or 'pairflip'"
            )
        self.imbalance_ratio = check_real("imbalance_ratio", imbalance_ratio, low=1.0)
        self.imbalance_profile = check_choice("imbalance_profile", imbalance_profile, IMBALANCE_PROFILES)
        self.meta_per_class = check_int("meta_per_class", meta_per_class, minimum=0)
        self.val_fraction = check_real("val_fraction", val_fraction, low=0.0, high=1.0)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.meta_batch_size = check_int("meta_batch_size", meta_batch_size, minimum=1)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed)
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool, got {type(pin_memory).__name__}")
        self.pin_memory = pin_memory
        self.save_hyperparameters()
        #: Optional sampler replacing the shuffled order of :meth:`train_dataloader`.
        self.train_sampler: Sampler | None = None
        self._is_set_up = False
        self._shuffle_generator: torch.Generator | None = None  # the latest training loader's
        self._pending_shuffle_state: Tensor | None = None  # from a checkpoint, for the next training loader

    # ------------------------------------------------------------------ to implement in subclasses
    def load_train_pool(self) -> tuple[Dataset, Tensor]:
        """Load the raw training pool.

        Returns:
            ``(dataset, targets)``: a map-style dataset yielding ``(x, y)`` with untransformed inputs, and its
            clean labels as a 1-D ``int64`` tensor.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load_train_pool()")

    def load_test_set(self) -> Dataset:
        """Load the raw test set, a map-style dataset yielding ``(x, y)`` with untransformed inputs."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_test_set()")

    # ------------------------------------------------------------------ pipeline
    def setup(self, stage: str | None = None) -> None:
        """Build every split (idempotent: later calls do nothing).

        Args:
            stage: the Lightning stage; all splits are built whatever it is.
        """
        if self._is_set_up:
            return
        pool, pool_targets = self.load_train_pool()
        if not hasattr(self, "num_classes"):
            self.num_classes = int(torch.as_tensor(pool_targets).max()) + 1
        pool_targets = as_labels(pool_targets, self.num_classes, name="pool targets")
        test_set = self.load_test_set()

        all_idx = torch.arange(pool_targets.numel())
        if self.val_fraction > 0:
            val_idx, rest = stratified_split(pool_targets, [self.val_fraction], seed=self._seed(_VAL_STREAM))
        else:
            val_idx, rest = all_idx[:0], all_idx
        if self.meta_per_class > 0:
            left = class_counts(pool_targets[rest], self.num_classes)
            if min(left) < self.meta_per_class:
                after = f" after the validation split (val_fraction={self.val_fraction})" if self.val_fraction else ""
                raise ValueError(
                    f"meta_per_class={self.meta_per_class} needs that many samples of every class, but{after} the "
                    f"classes have {left}: lower meta_per_class" + (" or val_fraction" if self.val_fraction else "")
                )
            meta_pos, train_pos = balanced_meta_split(
                pool_targets[rest], self.meta_per_class, seed=self._seed(_META_STREAM)
            )
            meta_idx, rest = rest[meta_pos], rest[train_pos]
        else:
            meta_idx = all_idx[:0]
        emptied = [c for c, n in enumerate(class_counts(pool_targets[rest], self.num_classes)) if n == 0]
        if emptied:
            warnings.warn(
                f"{type(self).__name__}: the validation and meta splits leave class(es) {emptied} without training "
                f"samples (val_fraction={self.val_fraction}, meta_per_class={self.meta_per_class})",
                UserWarning, stacklevel=1,  # attributed here: Lightning's trainer calls setup()
            )
        if self.imbalance_ratio > 1:
            try:
                kept = long_tailed_indices(
                    pool_targets[rest], self.imbalance_ratio, profile=self.imbalance_profile,
                    seed=self._seed(_LONGTAIL_STREAM), num_classes=self.num_classes,
                )
            except ValueError as err:  # a class the validation / meta split left empty
                raise ValueError(
                    f"{type(self).__name__}: the long-tailed subsample of what the validation and meta splits left "
                    f"(val_fraction={self.val_fraction}, meta_per_class={self.meta_per_class}) failed: {err}; take "
                    "fewer samples for those splits"
                ) from err
            rest = rest[kept]
        train_idx = rest
        clean = pool_targets[train_idx]
        noisy, mask = inject_label_noise(
            clean, self.noise_rate, kind=self.noise_kind, num_classes=self.num_classes,
            seed=self._seed(_NOISE_STREAM),
        )

        self.val_indices, self.meta_indices, self.train_indices = val_idx, meta_idx, train_idx
        self.clean_train_targets: Tensor = clean
        self.train_targets: Tensor = noisy
        self.noise_mask: Tensor = mask
        self.train_class_counts: list[int] = class_counts(noisy, self.num_classes)
        self.clean_train_class_counts: list[int] = class_counts(clean, self.num_classes)
        self.train_dataset = IndexedDataset(RelabeledSubset(pool, train_idx, noisy, self.train_transform))
        self.meta_dataset: Dataset | None = (
            RelabeledSubset(pool, meta_idx, pool_targets[meta_idx], self.train_transform)
            if self.meta_per_class > 0 else None
        )
        self.val_dataset = RelabeledSubset(pool, val_idx, pool_targets[val_idx], self.eval_transform)
        self.test_dataset = RelabeledSubset(
            test_set, torch.arange(len(cast(Sized, test_set))), None, self.eval_transform
        )
        self._is_set_up = True

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes not set: those that setup() sets get a message saying so
        if name in _SET_BY_SETUP:
            raise AttributeError(
                f"{type(self).__name__}.{name} is set by setup(): call dm.setup('fit') first (Lightning calls it "
                "in trainer.fit)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _seed(self, stream: int) -> int:
        return _stage_seed(self.seed, stream)

    def _require_setup(self) -> None:
        if not self._is_set_up:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before requesting dataloaders")

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory, **kwargs,
        )

    @staticmethod
    def _drop_single(size: int, batch_size: int) -> bool:
        """Whether a loader over ``size`` samples must drop its last batch (a single sample, unusable in BatchNorm)."""
        return size > 1 and size % batch_size == 1

    def _worker_generator(self, stream: int) -> torch.Generator:
        """The generator a loader with workers draws their base seed from: one per loader and global rank."""
        trainer = getattr(self, "trainer", None)
        return generator(_stage_seed(self._seed(stream), trainer.global_rank if trainer is not None else 0))

    def _shuffled(self, dataset: Dataset, batch_size: int, shuffle_generator: torch.Generator, worker_stream: int,
                  **kwargs: Any) -> DataLoader:
        """A loader whose order is drawn from ``shuffle_generator`` alone (its state then resumes the order).

        Without workers the loader also draws its (unused) worker base seed from it, as ``shuffle=True,
        generator=g`` does. With workers (persistent: the base seed is drawn once, not each epoch, and once more
        by a resumed run's new workers) the base seed comes from a generator of its own, seeded from
        ``worker_stream`` (one per loader) and the global rank, so the checkpointed shuffle state continues the
        uninterrupted run's order exactly, and random transforms in the workers draw different numbers in the
        training and meta loaders and on every rank.
        """
        if self.num_workers == 0:
            return self._loader(dataset, batch_size, shuffle=True, generator=shuffle_generator, **kwargs)
        sampler = RandomSampler(cast(Sized, dataset), generator=shuffle_generator)
        return self._loader(dataset, batch_size, sampler=sampler, generator=self._worker_generator(worker_stream),
                            **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Training batches ``(x, noisy_y, idx)``: seeded shuffle, or ``self.train_sampler`` when set.

        A partial last batch is kept, unless it would hold a single sample (per rank under DDP), which BatchNorm
        cannot normalise in train mode: that sample then waits for the next epoch's order.
        """
        self._require_setup()
        sampler = self.train_sampler
        trainer = getattr(self, "trainer", None)
        if sampler is None and shards_training_data(trainer):
            assert trainer is not None  # shards_training_data(None) is False
            # Lightning would inject a DistributedSampler seeded by seed_everything; this one is seeded by ``seed``
            # (and Lightning leaves a DistributedSampler alone, setting its epoch each epoch)
            sampler = DistributedSampler(self.train_dataset, **trainer.distributed_sampler_kwargs,
                                         shuffle=not trainer.overfit_batches, seed=self._seed(_SHUFFLE_STREAM))
            # the first iterator of a fit (with workers it draws at once) comes before Lightning's set_epoch, on a
            # resume before it restores its epoch counters: give the sampler the epoch it draws for
            sampler.set_epoch(fit_epoch(trainer, training_started=False))
            return self._loader(self.train_dataset, self.batch_size, sampler=sampler,
                                generator=self._worker_generator(_WORKER_SEED_STREAM),
                                drop_last=self._drop_single(len(sampler), self.batch_size))
        if sampler is None:
            if self._pending_shuffle_state is not None:  # resuming: continue the checkpointed order
                shuffle_generator = generator(self._seed(_SHUFFLE_STREAM))
                shuffle_generator.set_state(self._pending_shuffle_state)
                self._pending_shuffle_state = None
            elif self._shuffle_generator is not None and trainer is not None and trainer.current_epoch > 0:
                shuffle_generator = self._shuffle_generator  # reloaded during a run: the order goes on
            else:
                shuffle_generator = generator(self._seed(_SHUFFLE_STREAM))  # a new run
            self._shuffle_generator = shuffle_generator
            return self._shuffled(self.train_dataset, self.batch_size, shuffle_generator, _WORKER_SEED_STREAM,
                                  drop_last=self._drop_single(len(self.train_dataset), self.batch_size))
        # a sampler set by the user or a callback (DeferredResampling's): with workers, their base seed comes from
        # this loader's own per-rank generator, not the global RNG (which seed_everything makes equal on every rank)
        workers = self._worker_generator(_WORKER_SEED_STREAM) if self.num_workers > 0 else None
        if isinstance(sampler, BatchSampler):
            return DataLoader(self.train_dataset, batch_sampler=sampler, num_workers=self.num_workers,
                              persistent_workers=self.num_workers > 0, pin_memory=self.pin_memory, generator=workers)
        size = len(sampler) if isinstance(sampler, Sized) else 0  # an unsized sampler: as it is
        if trainer is not None and shards_training_data(trainer) and not isinstance(sampler, DistributedSampler):
            size = -(-size // trainer.world_size)  # Lightning shards it: each rank iterates ceil(len / world)
        return self._loader(self.train_dataset, self.batch_size, sampler=sampler,
                            drop_last=self._drop_single(size, self.batch_size), generator=workers)

    def state_dict(self) -> dict[str, Any]:
        """The training shuffle's generator state (Lightning stores it in every checkpoint).

        A run resumed from an end-of-epoch checkpoint then shuffles its next epochs as the uninterrupted run
        does, instead of replaying the first epoch's order.
        """
        if self._shuffle_generator is None:
            return {}
        return {"shuffle_generator_state": self._shuffle_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the shuffle state of :meth:`state_dict` for the next :meth:`train_dataloader`."""
        state = state_dict.get("shuffle_generator_state")
        self._pending_shuffle_state = None if state is None else torch.as_tensor(state, dtype=torch.uint8).clone()

    def meta_dataloader(self) -> DataLoader:
        """Clean, balanced meta batches ``(x, y)`` (shuffled, ``meta_batch_size``).

        A partial last batch is kept, unless it would hold a single sample, which BatchNorm cannot normalise in
        train mode (the meta forward would fail on it).
        """
        self._require_setup()
        if self.meta_dataset is None:
            raise RuntimeError("no meta set: meta_per_class=0; pass meta_per_class >= 1 to build one")
        size = len(self.meta_dataset)  # type: ignore[arg-type]
        return self._shuffled(self.meta_dataset, self.meta_batch_size, generator(self._seed(_META_SHUFFLE_STREAM)),
                              _META_WORKER_SEED_STREAM, drop_last=self._drop_single(size, self.meta_batch_size))

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` (clean labels, ``eval_batch_size``); empty if ``val_fraction=0``."""
        self._require_setup()
        return self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches ``(x, y)`` (``eval_batch_size``)."""
        self._require_setup()
        return self._loader(self.test_dataset, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test batches, in order, for ``trainer.predict`` (the model reads the inputs)."""
        return self.test_dataloader()
