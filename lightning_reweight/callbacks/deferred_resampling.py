"""DRS: deferred re-sampling (Cao et al. 2019): the natural data stream, then class-balanced sampling."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_reweight._progress import fit_epoch, shards_training_data
from lightning_reweight.callbacks._data import loader_uses_sampler
from lightning_reweight.callbacks._schedule import warn_if_never_reached
from lightning_reweight.functional.longtail import class_balanced_sample_weights
from lightning_reweight.samplers import DeferredWeightedSampler

__all__ = ["DeferredResampling"]


class DeferredResampling(Callback):
    """Shuffled epochs before ``start_epoch``, class-balanced sampling with replacement from it on (DRS).

    Rule: from ``start_epoch`` on, sample ``i`` is drawn with probability proportional to the class-balanced
    weight of its class, ``w_{y_i} = (1 - beta) / (1 - beta^{n_{y_i}})``
    (:func:`~lightning_reweight.functional.class_balanced_sample_weights`); class ``j`` is therefore drawn with
    probability proportional to ``n_j w_j``, nearly uniform over classes for ``beta = 0.9999``. An epoch keeps its
    length (the dataset size). Before ``start_epoch`` every sample is seen once per epoch, shuffled.

    Unlike the reference implementation, the sampling really reaches the data loader: in ``setup`` the callback
    installs a :class:`~lightning_reweight.samplers.DeferredWeightedSampler` as the datamodule's
    ``train_sampler`` (which its ``train_dataloader()`` must use). The sampler reads the trainer's epoch whenever
    it draws an epoch's indices (Lightning's count of processed epochs), so the switch happens
    exactly at ``start_epoch``, also right after a resume, when Lightning builds the loader iterator (and a loader
    with workers draws its first indices) before the loop updates ``current_epoch``. ``on_train_start`` checks that
    the training loader really uses the sampler; the datamodule's own sampler is put back after the fit, also
    after one that failed. Under DDP all ranks draw the same list (the seed is broadcast from rank 0) and each
    yields its share (the sampler is a ``DistributedSampler``, which Lightning leaves in place: its order follows
    ``seed``, not ``seed_everything``).

    Needs a datamodule with ``train_sampler`` (settable) and ``train_targets`` (the label of every training
    sample, aligned with dataset indices), as :class:`~lightning_reweight.data.ReweightDataModule` provides.

    Args:
        start_epoch: first epoch (0-based) with class-balanced sampling.
        beta: the effective-number parameter, in ``[0, 1)``.
        seed: base seed of the sampler (default: drawn from torch's RNG on rank 0 at setup).

    Example:
        >>> cb = DeferredResampling(start_epoch=160, beta=0.9999)
        >>> cb.sampler is None  # created in setup
        True
    """

    def __init__(self, start_epoch: int, beta: float = 0.9999, seed: int | None = None) -> None:
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.start_epoch = int(start_epoch)
        self.beta = float(beta)
        self._seed = seed
        self._sampler: DeferredWeightedSampler | None = None
        self._previous_sampler: Any = None
        self._datamodule: Any = None
        self._trainer: Trainer | None = None

    @property
    def sampler(self) -> DeferredWeightedSampler | None:
        """The sampler installed in the datamodule (``None`` before ``setup``)."""
        return self._sampler

    @property
    def active(self) -> bool:
        """Whether the current epoch samples class-balanced."""
        if self._sampler is None:
            return False
        epoch = self._trainer.current_epoch if self._trainer is not None else None
        return self._sampler.is_weighted(epoch)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime by Lightning
        if dm is None or not hasattr(dm, "train_sampler") or getattr(dm, "train_targets", None) is None:
            raise ValueError(
                "DeferredResampling needs a datamodule with `train_targets` and a `train_sampler` attribute that "
                "train_dataloader() passes to its DataLoader (see lightning_reweight.data.ReweightDataModule)"
            )
        current = dm.train_sampler
        if current is not None and current is not self._sampler:
            raise ValueError(
                f"the datamodule already has a train_sampler ({type(current).__name__}); DeferredResampling "
                "installs its own: remove the other sampler"
            )
        targets = torch.as_tensor(dm.train_targets).long().cpu()
        classes = getattr(dm, "num_classes", None)
        counts = torch.bincount(targets, minlength=classes if isinstance(classes, int) else 0)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"DeferredResampling: class(es) {empty} have no training samples (class counts {counts.tolist()}); "
                "class-balanced resampling needs every class in the training set"
            )
        weights = class_balanced_sample_weights(targets, counts.tolist(), self.beta)
        seed = self._seed if self._seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        seed = int(trainer.strategy.broadcast(seed, src=0))
        self._seed = seed
        shares = trainer.distributed_sampler_kwargs if shards_training_data(trainer) else None
        self._sampler = DeferredWeightedSampler(
            targets.numel(), weights, self.start_epoch, seed=seed, epoch_source=_TrainerEpoch(trainer),
            # explicit: 1 process when Lightning does not shard (use_distributed_sampler=False: every rank the list)
            num_replicas=shares["num_replicas"] if shares else 1, rank=shares["rank"] if shares else 0,
        )
        self._previous_sampler, self._datamodule, self._trainer = current, dm, trainer
        dm.train_sampler = self._sampler

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        warn_if_never_reached(trainer, self.start_epoch, "DeferredResampling")
        if self._sampler is not None and isinstance(self._sampler.epoch_source, _TrainerEpoch):
            self._sampler.epoch_source.training_started = True
        if self._sampler is not None and not loader_uses_sampler(trainer.train_dataloader, self._sampler):
            overfit = trainer.overfit_batches  # type: ignore[attr-defined]  # set at runtime by Lightning
            if overfit > 0:
                raise RuntimeError(
                    f"DeferredResampling cannot run with overfit_batches={overfit}: Lightning "
                    "replaces the training loader's sampler by a sequential one to overfit the same batches, so "
                    "class-balanced sampling would silently never happen; leave DeferredResampling out of an "
                    "overfit_batches run"
                )
            raise RuntimeError(
                f"DeferredResampling installed its sampler as {type(self._datamodule).__name__}.train_sampler, but "
                "the training DataLoader does not use it (class-balanced sampling would silently never happen): "
                "train_dataloader() must pass self.train_sampler to its DataLoader, as ReweightDataModule does"
            )

    def _restore_sampler(self) -> None:
        if self._datamodule is not None and self._datamodule.train_sampler is self._sampler:
            self._datamodule.train_sampler = self._previous_sampler

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore_sampler()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # teardown does not run after an exception: leave the datamodule as it was given
        self._restore_sampler()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start_epoch": self.start_epoch, "beta": self.beta, "seed": self._seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seed = state_dict.get("seed")
        if seed is not None:
            self._seed = int(seed)
            if self._sampler is not None:
                self._sampler.seed = self._seed


class _TrainerEpoch:
    """Callable returning the epoch the trainer's loader draws for (a class rather than a lambda, so it pickles).

    ``training_started`` is set by the callback's ``on_train_start``: from then on the epoch is the trainer's.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.training_started = False

    def __call__(self) -> int:
        return fit_epoch(self.trainer, self.training_started)
