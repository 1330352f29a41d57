"""SusceptibilityMonitor: watch memorisation of noisy labels without clean labels."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from typing_extensions import override

from lightning_reweight._forwards import extra_forwards, in_extra_forward
from lightning_reweight._modes import eval_mode
from lightning_reweight.callbacks._data import starts_new_run, train_dataset
from lightning_reweight.callbacks._records import cat_or_none, gather_records, records_for_rank
from lightning_reweight.contract import _targets_and_indices, split_batch
from lightning_reweight.functional.susceptibility import needs_closure, preserved_rng, susceptibility_losses
from lightning_reweight.loggers import (
    _callback_metrics,
    define_epoch_axis,
    epoch_end_step,
    log_histograms,
    log_step,
    publish_metrics,
)

__all__ = ["SusceptibilityMonitor"]

#: Every key the monitor logs, under its ``prefix`` (W&B plots them against ``epoch``).
_KEYS = ("drop", "zeta", "random_label_loss", "train_acc_noisy", "train_acc_clean", "weight_mean_noisy",
         "weight_mean_clean", "weights_noisy", "weights_clean")

SUBSET_ACCURACY = ("train_forward", "eval_pass", "off")
_FOLD_EVERY = 64  # training steps whose logits are kept before they are folded into the counts
_FOLD_NUMEL = 1 << 20  # ... or fewer, once the kept logits reach this many elements (4 MiB in fp32)


_INPUT_KEYS = ("x", "inputs", "input", "image", "images", "pixel_values")


def _inputs_of(sample: Any) -> Tensor:
    """The inputs of a dataset sample or a loader batch: itself, its first element, or a known dict key."""
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    elif isinstance(sample, Mapping):
        key = next((k for k in _INPUT_KEYS if k in sample), None)
        if key is None:
            raise TypeError(
                f"SusceptibilityMonitor found no inputs in a sample with keys {sorted(map(str, sample))} (it looks "
                f"for {', '.join(_INPUT_KEYS)}): pass unlabelled_loader=... yielding input tensors or (inputs, ...) "
                "tuples"
            )
        sample = sample[key]
    return sample if isinstance(sample, Tensor) else torch.as_tensor(sample)


class SusceptibilityMonitor(Callback):
    """Log the susceptibility to noisy labels, ``zeta``, once per epoch (Forouzesh, Sedghi & Thiran, ICLR 2023).

    A randomly labelled set is built once, at the first measurement: ``pool_size`` training inputs
    (``trainer.datamodule.train_dataset``, else the train loader's dataset; chosen with a generator seeded by
    ``seed``) or the first ``pool_size`` inputs of ``unlabelled_loader``, read into memory once (as the dataset
    returns them then, transforms included), each given a label drawn uniformly over all classes with the same
    generator. The labels and the chosen indices are fixed for the run and saved in checkpoints. At the
    start of every ``every_n_epochs``-th epoch (at its first batch, before that batch trains: after the module's
    own ``on_train_epoch_start``, which may set layers' modes for the epoch), one batch of ``batch_size`` of that
    set (drawn with the monitor's own generator, seeded by ``seed`` and the epoch) goes through
    :func:`~lightning_reweight.functional.susceptibility_step` with the training optimizer
    ``trainer.optimizers[0]``: the loss drop of one step on random labels, after which parameters, buffers,
    gradients, optimizer state and the random number generators are restored exactly. Training with the monitor
    is therefore bit-identical to training without it.

    Logged to every logger of the trainer (and put in ``trainer.callback_metrics``, so ``ModelCheckpoint`` can
    monitor ``memorization/zeta``; under DDP the drop is averaged over ranks so all ranks hold the same ``zeta``,
    and rank zero writes):

    - ``memorization/drop``: this epoch's drop; ``memorization/zeta``: the running mean of the drops;
      ``memorization/random_label_loss``: the loss on the random-label batch before the step (a confident network
      has a high one, and a large drop then partly reflects undoing that confidence rather than memorising).
    - When the datamodule has a ``noise_mask`` (True = noisy, indexed by the dataset index the train batches
      carry as third element): ``memorization/train_acc_noisy`` and ``memorization/train_acc_clean``, the
      accuracy on the given (noisy) labels of the noisy and the clean training samples (``subset_accuracy``):

      - ``"train_forward"`` (default, as in the authors' code): the predictions the model made in its training
        forward on each training batch of a measured epoch, counted per subset over the epoch (under DDP,
        summed over ranks) and logged at the epoch's end. The accuracy is thus measured *during* the epoch,
        while the model trains; it costs a few microseconds per step (the forward hook keeps a detached
        reference to the logits; they are folded into the counts with one argmax every 64 steps, or sooner once
        they hold 2**20 elements, on the device, with no host sync before the epoch's end).
        The logits are read with a forward hook on the LightningModule: the first output of the module's
        ``__call__`` between ``on_train_batch_start`` and ``on_train_batch_end`` whose batch size is the
        training batch's, leaving out the library's own forwards (meta-reweighting's virtual-step and shifted
        forwards, the monitors' probes). A
        ``training_step`` that never calls the module itself (only submodules) yields no counts (a warning
        says so; use ``"eval_pass"``).
      - ``"eval_pass"``: a snapshot at the epoch's start, from a no-grad eval-mode pass over the training set
        at the same time as the probe (one forward over the training set per measurement; the inputs are read
        once and kept in memory, each rank keeps and evaluates its own 1/world share).
      - ``"off"``: not logged.
    - When a reweighting source is attached to the module (it sets ``last_sample_weights`` /
      ``last_sample_indices``) and the noise mask is known: ``memorization/weight_mean_clean`` and
      ``memorization/weight_mean_noisy`` each epoch, and histograms ``memorization/weights_clean`` /
      ``memorization/weights_noisy`` to W&B and TensorBoard (``log_weight_histograms``; rank zero's samples).

    The probe calls the LightningModule's ``forward`` on a batch of inputs (inside the trainer's precision
    context) and takes the logits out of its output with :meth:`logits_from_output` (the output itself, a
    ``"logits"`` entry, or the first element of a tuple); override that, or :meth:`compute_logits`, for modules
    whose forward returns something else. A monitor reused for a new fit (not resumed) starts afresh.

    Args:
        batch_size: size of the randomly labelled batch of each measurement (128 in the paper).
        every_n_epochs: measure at the start of every n-th epoch.
        unlabelled_loader: a loader of unlabelled inputs (batches of inputs or tuples whose first element is
            the inputs) to draw from instead of the training inputs; its first ``pool_size`` inputs are read
            into memory at the first measurement.
        seed: seeds the random labels and the per-epoch batch choice.
        num_classes: number of classes (default: ``pl_module.num_classes`` or ``datamodule.num_classes``).
        subset_accuracy: how to measure train accuracy on the noisy and the clean subsets when the noise mask
            is known: ``"train_forward"``, ``"eval_pass"`` or ``"off"`` (see above).
        log_weight_histograms: log the weights of clean and noisy samples when a reweighting source is active.
        eval_batch_size: batch size of the ``"eval_pass"`` subset-accuracy pass.
        pool_size: size of the randomly labelled set kept in memory (at least ``batch_size``).
        prefix: prefix of the logged keys.

    Example:
        >>> monitor = SusceptibilityMonitor(batch_size=64)
        >>> monitor.zeta is None
        True
    """

    def __init__(
        self,
        batch_size: int = 128,
        every_n_epochs: int = 1,
        unlabelled_loader: DataLoader | None = None,
        seed: int = 0,
        num_classes: int | None = None,
        subset_accuracy: Literal["train_forward", "eval_pass", "off"] = "train_forward",
        log_weight_histograms: bool = True,
        eval_batch_size: int = 512,
        pool_size: int = 2048,
        prefix: str = "memorization",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if pool_size < batch_size:
            raise ValueError(f"pool_size ({pool_size}) must be >= batch_size ({batch_size})")
        if subset_accuracy not in SUBSET_ACCURACY:
            raise ValueError(f"subset_accuracy must be one of {SUBSET_ACCURACY}, got {subset_accuracy!r}")
        if eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.unlabelled_loader = unlabelled_loader
        self.seed = seed
        self._num_classes_arg = num_classes
        self._subset_accuracy_arg = subset_accuracy
        self.log_weight_histograms = log_weight_histograms
        self.eval_batch_size = eval_batch_size
        self.pool_size = pool_size
        self.prefix = prefix
        self._state_key: tuple[str, str] | None = None
        self._weights: list[Tensor] = []
        self._weight_indices: list[Tensor] = []
        self._reset_run_state()
        # "train_forward" route: this epoch's counts [clean wrong, clean right, noisy wrong, noisy right], fed by
        # (detached logits, targets, indices) of the training forwards, folded in every _FOLD_EVERY steps
        self._hook: Any = None
        self._counting = False
        self._armed: tuple[int, Tensor, Tensor] | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_numel = 0
        self._mask_key: Tensor | None = None
        self._train_counts: Tensor | None = None

    def _reset_run_state(self) -> None:
        """The randomly labelled set, the measurements and the cached data of one run."""
        self.num_classes: int | None = self._num_classes_arg
        self.subset_accuracy = self._subset_accuracy_arg  # a run that found no subset data turned it "off"
        self._labels: Tensor | None = None
        self._epochs: list[int] = []
        self._drops: list[float] = []
        self._logged: list[dict[str, float]] = []
        self._pool: Tensor | None = None
        self._pool_indices: Tensor | None = None
        self._dataset: Any = None
        self._eval_data: tuple[Tensor, Tensor, Tensor] | None = None
        self._trainer: Trainer | None = None
        self._begun_epoch: int | None = None  # the epoch on_train_epoch_start last ran for
        self._ended_epoch: int | None = None  # the epoch on_train_epoch_end last ran for
        self._measure_due = False  # the begun epoch's probe waits for its first batch
        self._pending_epoch_records: dict[str, Any] | None = None  # a mid-epoch checkpoint's, until its epoch runs

    # ------------------------------------------------------------------ public read-only views
    @property
    def history(self) -> list[tuple[int, float]]:
        """``(epoch, drop)`` of every measurement so far."""
        return list(zip(self._epochs, self._drops))

    @property
    def zeta(self) -> float | None:
        """The susceptibility: running mean of the drops (``None`` before the first measurement)."""
        return sum(self._drops) / len(self._drops) if self._drops else None

    @property
    def logged_history(self) -> list[dict[str, float]]:
        """Everything the monitor logged, one dict per epoch (``{"epoch": e, "memorization/drop": ...}``)."""
        return [dict(d) for d in self._logged]

    @property
    def random_labels(self) -> Tensor | None:
        """The fixed random labels of the randomly labelled set (``None`` before the first measurement)."""
        return self._labels

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key; monitors with different ``prefix`` keep separate states.

        Lightning formats it on every hook call (its profiler's action name), so it is built once per ``prefix``.
        """
        cached = self._state_key
        if cached is None or cached[0] != self.prefix:
            cached = self._state_key = (self.prefix, self._generate_state_key(prefix=self.prefix))
        return cached[1]

    # ------------------------------------------------------------------ overridable policy
    def compute_logits(self, pl_module: LightningModule, inputs: Tensor) -> Tensor:
        """Logits of ``inputs`` for the probe; default :meth:`logits_from_output` of ``pl_module(inputs)``."""
        output = pl_module(inputs)
        logits = self.logits_from_output(output)
        if logits is None:
            raise TypeError(
                f"SusceptibilityMonitor needs logits, but {type(pl_module).__name__}'s forward returned "
                f"{type(output).__name__}: override SusceptibilityMonitor.logits_from_output (or compute_logits)"
            )
        return logits

    def logits_from_output(self, output: Any) -> Tensor | None:
        """The logits in an output of the LightningModule's ``forward``, ``None`` if there are none.

        Default: the output itself when it is a tensor, its ``"logits"`` entry when it is a mapping, its first
        element when it is a tuple or list. Used by the probe (through :meth:`compute_logits`) and by the
        ``"train_forward"`` subset accuracy, which reads the training forward's output.

        Example:
            >>> import torch
            >>> logits = torch.zeros(2, 3)
            >>> monitor = SusceptibilityMonitor()
            >>> monitor.logits_from_output({"logits": logits, "features": None}) is logits
            True
            >>> monitor.logits_from_output("text") is None
            True
        """
        if isinstance(output, Mapping):
            output = output.get("logits")
        elif isinstance(output, (tuple, list)) and output:
            output = output[0]
        return output if isinstance(output, Tensor) else None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(trainer.strategy).__name__
        if "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name:
            raise ValueError(
                f"SusceptibilityMonitor does not support the {name} strategy (its probe steps the unsharded "
                "module's optimizer); use strategy='ddp' or remove the monitor"
            )
        if starts_new_run(trainer):
            # a new run: its own random labels and history (a checkpoint being resumed is loaded after this hook)
            self._reset_run_state()
        self._trainer = trainer

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.optimizers or type(trainer.optimizers[0]).__name__ == "_MockOptimizer":
            raise ValueError(
                "SusceptibilityMonitor needs the training optimizer (trainer.optimizers[0]); "
                "configure_optimizers returned none"
            )
        if needs_closure(trainer.optimizers[0]):
            raise ValueError(
                f"SusceptibilityMonitor cannot probe with {type(trainer.optimizers[0]).__name__}: its step needs a "
                "closure (it re-evaluates the loss several times), which one probe step does not define"
            )
        if len(trainer.optimizers) > 1:
            rank_zero_warn(
                f"SusceptibilityMonitor steps only the first of the {len(trainer.optimizers)} optimizers in its probe: "
                "the parameters of the others stay fixed, so zeta measures how fast those of optimizer 0 fit random "
                "labels"
            )
        if self.num_classes is None:
            n = getattr(pl_module, "num_classes", None)
            if n is None:
                n = getattr(pl_module, "hparams", {}).get("num_classes")
            # Trainer.datamodule: set at runtime by Lightning, not in its annotations
            if n is None and trainer.datamodule is not None:  # type: ignore[attr-defined]
                n = getattr(trainer.datamodule, "num_classes", None)  # type: ignore[attr-defined]
            if n is None:
                raise ValueError(
                    "SusceptibilityMonitor could not infer the number of classes: pass num_classes=... "
                    "(or give the module or the datamodule a num_classes attribute)"
                )
            self.num_classes = int(n)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        define_epoch_axis(trainer, [f"{self.prefix}/{key}" for key in _KEYS])
        mask = self._noise_mask(trainer) if self.subset_accuracy == "train_forward" else None
        if mask is not None and self._hook is None:
            self._mask_key = 2 * mask.to(device=pl_module.device, dtype=torch.long)
            self._hook = pl_module.register_forward_hook(self._capture_train_logits)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a resumed run: Lightning emptied callback_metrics after the checkpoint loaded, and the first epoch may
        # not measure (already measured, or every_n_epochs): put the latest values back for ModelCheckpoint
        latest = {k: v for record in self._logged for k, v in record.items() if k != "epoch"}
        _callback_metrics(trainer).update({k: torch.tensor(v) for k, v in latest.items()})
        self._close_checkpoint_epoch(trainer, pl_module)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # teardown does not run after an exception: leave the module as it was given
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._counting = False
        self._begun_epoch = None
        self._armed = None
        self._pending.clear()
        self._pending_numel = 0
        self._train_counts = None

    def _train_dataset(self, trainer: Trainer) -> Any:
        if self._dataset is None:
            dataset = train_dataset(trainer)
            if dataset is None:
                raise ValueError(
                    "SusceptibilityMonitor found no training dataset (trainer.datamodule.train_dataset or "
                    "trainer.train_dataloader.dataset): pass unlabelled_loader=..."
                )
            self._dataset = dataset
        return self._dataset

    def _ensure_pool(self, trainer: Trainer) -> None:
        """Read the randomly labelled set's inputs into memory once and draw its labels (first measurement)."""
        if self._pool is not None:
            return
        with preserved_rng():  # reading the data may draw from the global RNGs (shuffling, random transforms)
            self._build_pool(trainer)

    def _build_pool(self, trainer: Trainer) -> None:
        g = torch.Generator().manual_seed(self.seed)
        if self.unlabelled_loader is not None:
            chunks, count = [], 0
            for batch in self.unlabelled_loader:
                chunks.append(_inputs_of(batch).cpu())
                count += chunks[-1].shape[0]
                if count >= self.pool_size:
                    break
            if not chunks:
                raise ValueError("unlabelled_loader is empty: pass a loader that yields inputs")
            pool = torch.cat(chunks)[: self.pool_size]
            indices = torch.arange(pool.shape[0])
        else:
            dataset = self._train_dataset(trainer)
            try:
                size = len(dataset)
            except TypeError as err:  # an IterableDataset
                raise ValueError(
                    f"SusceptibilityMonitor picks its random-label inputs by index from the training set, but "
                    f"{type(dataset).__name__} has no length (an IterableDataset?): pass unlabelled_loader=..."
                ) from err
            indices = torch.randperm(size, generator=g)[: self.pool_size].sort().values
            pool = torch.stack([_inputs_of(dataset[int(i)]) for i in indices])
        if self._pool_indices is not None and not torch.equal(self._pool_indices, indices):
            raise ValueError(
                "the checkpoint's randomly labelled set differs from the one rebuilt now (different data, seed or "
                "pool_size): resume with the same training data, seed and pool_size"
            )
        labels = torch.randint(int(self.num_classes or 2), (indices.shape[0],), generator=g)
        if self._labels is not None and not torch.equal(self._labels, labels):
            raise ValueError("the checkpoint's random labels differ from the ones drawn now: same seed/num_classes?")
        self._pool_indices, self._labels, self._pool = indices, labels, pool

    def probe_batch(self, trainer: Trainer, epoch: int) -> tuple[Tensor, Tensor]:
        """The randomly labelled batch of ``epoch`` (inputs on CPU, labels), the same on every rank."""
        self._ensure_pool(trainer)
        assert self._pool is not None and self._labels is not None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        idx = torch.randperm(self._pool.shape[0], generator=g)[: self.batch_size]
        return self._pool.index_select(0, idx), self._labels.index_select(0, idx)

    def _noise_mask(self, trainer: Trainer) -> Tensor | None:
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime by Lightning
        mask = getattr(dm, "noise_mask", None) if dm is not None else None
        return None if mask is None else torch.as_tensor(mask, dtype=torch.bool)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._begun_epoch = trainer.current_epoch
        self._weights.clear()
        self._weight_indices.clear()
        epoch = trainer.current_epoch
        measure = not (epoch % self.every_n_epochs or (self._epochs and self._epochs[-1] >= epoch))
        self._counting = measure and self._hook is not None
        if self._counting:
            self._train_counts = torch.zeros(4, dtype=torch.long, device=pl_module.device)
            self._pending.clear()
            self._pending_numel = 0
        # measured at the epoch's first batch: after the module's own on_train_epoch_start (Lightning runs the
        # callbacks' first), which may switch layers' modes for the epoch (a frozen backbone put in eval mode)
        self._measure_due = measure

    def _measure(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """This epoch's probe (and the ``"eval_pass"`` subset accuracies), published at the epoch's first step."""
        self._measure_due = False
        epoch = trainer.current_epoch
        optimizer = trainer.optimizers[0]
        device = pl_module.device
        precision = trainer.precision_plugin

        def forward(x: Tensor) -> Tensor:
            x = precision.convert_input(x)  # as Lightning prepares batches: 64-true / bf16-true input dtype
            with extra_forwards(), precision.forward_context():  # no monitor takes it for the training forward
                logits = self.compute_logits(pl_module, x)
            if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                raise ValueError(
                    f"SusceptibilityMonitor draws labels from num_classes={self.num_classes} classes, but the "
                    f"model's logits have shape {tuple(logits.shape)}: pass num_classes=<number of logits>"
                )
            return logits

        mask = self._noise_mask(trainer) if self.subset_accuracy == "eval_pass" else None
        counts = None
        if mask is not None:
            with preserved_rng():
                try:
                    counts = self._subset_counts(trainer, pl_module, mask, forward)
                except TypeError as err:  # the train batches are not (inputs, targets[, indices])
                    rank_zero_warn(f"SusceptibilityMonitor: noisy/clean subset accuracy disabled ({err})")
                    self.subset_accuracy = "off"
        inputs, targets = self.probe_batch(trainer, epoch)  # own generator: the global RNGs are not drawn from
        pair = susceptibility_losses(pl_module, optimizer, inputs.to(device), targets.to(device), forward=forward)
        losses = trainer.strategy.reduce(torch.stack(pair), reduce_op="mean")
        drop, before = float(losses[0] - losses[1]), float(losses[0])  # the drop in fp32, as susceptibility_step
        if not math.isfinite(drop):  # e.g. an fp16 overflow in the unscaled probe step: zeta would stay nan
            rank_zero_warn(f"SusceptibilityMonitor: the probe's drop is {drop} at epoch {epoch}; measurement skipped")
            return
        self._epochs.append(epoch)
        self._drops.append(drop)
        log = {
            f"{self.prefix}/drop": drop,
            f"{self.prefix}/zeta": float(self.zeta or 0.0),
            f"{self.prefix}/random_label_loss": before,
        }
        if counts is not None:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
            noisy_ok, noisy_n, clean_ok, clean_n = (float(c) for c in counts)
            if noisy_n > 0:
                log[f"{self.prefix}/train_acc_noisy"] = noisy_ok / noisy_n
            if clean_n > 0:
                log[f"{self.prefix}/train_acc_clean"] = clean_ok / clean_n
        self._publish(trainer, epoch, log)

    def _publish(self, trainer: Trainer, epoch: int, values: dict[str, float], step: int | None = None) -> None:
        """Record ``values``, expose them in ``trainer.callback_metrics`` and send them to every logger.

        They go at ``step`` (default :func:`~lightning_reweight.loggers.log_step`; epoch-end values go where
        Lightning writes its own epoch-end values, :func:`~lightning_reweight.loggers.epoch_end_step`).
        The values are already identical on every rank (reduced), so they bypass ``LightningModule.log`` (whose
        per-call bookkeeping costs about a millisecond per key) and go straight to the loggers, which write on
        rank zero only. ``ModelCheckpoint``/``EarlyStopping`` can monitor them through ``callback_metrics``.
        """
        if not values:
            return
        if not self._logged or self._logged[-1]["epoch"] != epoch:
            self._logged.append({"epoch": epoch})
        self._logged[-1].update(values)
        publish_metrics(trainer, values, epoch=epoch, step=log_step(trainer) if step is None else step)

    def _subset_counts(self, trainer: Trainer, pl_module: LightningModule, mask: Tensor, forward: Any) -> Tensor:
        """``[noisy correct, noisy total, clean correct, clean total]`` over this rank's share of the train set."""
        if self._eval_data is None:
            dataset = self._train_dataset(trainer)
            positions = torch.arange(trainer.global_rank, len(dataset), trainer.world_size)
            loader = DataLoader(
                Subset(dataset, positions.tolist()),
                batch_size=self.eval_batch_size,
                shuffle=False,
                generator=torch.Generator(),
            )
            xs, ys, ids, seen = [], [], [], 0
            for batch in loader:
                x, y, idx = split_batch(batch)
                xs.append(x)
                ys.append(y)
                ids.append(positions[seen : seen + len(y)] if idx is None else idx)
                seen += len(y)
            self._eval_data = (torch.cat(xs), torch.cat(ys).cpu(), mask[torch.cat(ids).cpu()])
        x_all, y_all, noisy = self._eval_data
        correct = torch.empty_like(noisy)
        with torch.no_grad(), eval_mode(pl_module):
            for start in range(0, x_all.shape[0], self.eval_batch_size):
                x = x_all[start : start + self.eval_batch_size].to(pl_module.device)
                pred = forward(x).argmax(dim=1).cpu()
                correct[start : start + x.shape[0]] = pred == y_all[start : start + x.shape[0]]
        counts = torch.stack(
            [(correct & noisy).sum(), noisy.sum(), (correct & ~noisy).sum(), (~noisy).sum()]
        ).double()
        return counts.to(pl_module.device)

    # ------------------------------------------------------------------ "train_forward" subset accuracy
    def _capture_train_logits(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Forward hook: keep the predictions of the first output of the training batch's size, then disarm."""
        armed = self._armed
        if armed is None or in_extra_forward():  # a probe's or a meta-gradient route's forward
            return
        logits = self.logits_from_output(output)
        if logits is not None and logits.dim() == 2 and logits.shape[0] == armed[0]:
            self._pending.append((logits.detach(), armed[1], armed[2]))  # argmax once per fold, not per step
            self._pending_numel += logits.numel()
            self._armed = None

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._begun_epoch != trainer.current_epoch:
            # Lightning runs no on_train_epoch_start for the epoch a run resumes into from a mid-epoch or an
            # epoch's-last-batch checkpoint: begin it here, before its first batch trains (measured epochs are
            # not measured twice)
            self.on_train_epoch_start(trainer, pl_module)
            self._restore_epoch_records(trainer, pl_module)
        if self._measure_due:
            self._measure(trainer, pl_module)
        if not self._counting:
            return
        hook = getattr(pl_module, "batch_targets_and_indices", None)  # the contract's reading of the batch
        try:
            targets, indices = hook(batch) if hook is not None else _targets_and_indices(batch)
        except TypeError as err:
            targets, indices, reason = None, None, str(err)
        else:
            reason = ("the train batches carry no dataset indices (third element)" if targets is not None else
                      "no targets found in the train batches: (inputs, targets[, indices]) tuples, or override the "
                      "module's batch_targets_and_indices(batch)")
        if indices is None or targets is None:
            rank_zero_warn(f"SusceptibilityMonitor: noisy/clean subset accuracy disabled ({reason})")
            self.teardown(trainer, pl_module, "fit")
            self.subset_accuracy = "off"
            return
        self._armed = (int(targets.shape[0]), targets, indices)

    def _fold(self) -> None:
        """Add the pending training predictions to this epoch's counts (device ops only, no host sync)."""
        pending, self._pending, self._pending_numel = self._pending, [], 0
        if not pending or self._train_counts is None or self._mask_key is None:
            return
        logits, targets, indices = (torch.cat(t) if len(t) > 1 else t[0] for t in zip(*pending))
        preds = logits.argmax(dim=1)
        key = self._mask_key[indices.to(self._mask_key.device)] + (preds == targets.to(preds.device)).to(
            self._mask_key.device
        )
        self._train_counts += torch.bincount(key, minlength=4).to(self._train_counts.device)

    def _train_count_values(self, trainer: Trainer) -> dict[str, float]:
        """Reduce this epoch's training-forward counts over ranks: the noisy/clean accuracies to log."""
        self._fold()
        counts, self._train_counts, self._counting = self._train_counts, None, False
        if counts is None:
            return {}
        clean_bad, clean_ok, noisy_bad, noisy_ok = trainer.strategy.reduce(counts.double(), reduce_op="sum").tolist()
        if clean_bad + clean_ok + noisy_bad + noisy_ok == 0:
            rank_zero_warn(
                "SusceptibilityMonitor: no logits of the training batch's size were seen in the training forwards "
                "this epoch (does training_step call the LightningModule itself, and does logits_from_output find "
                "the logits in its output?); subset accuracy disabled: override logits_from_output or use "
                "subset_accuracy='eval_pass'"
            )
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self.subset_accuracy = "off"
            return {}
        log = {}
        if noisy_bad + noisy_ok > 0:
            log[f"{self.prefix}/train_acc_noisy"] = noisy_ok / (noisy_bad + noisy_ok)
        if clean_bad + clean_ok > 0:
            log[f"{self.prefix}/train_acc_clean"] = clean_ok / (clean_bad + clean_ok)
        return log

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counting:
            self._armed = None
            if len(self._pending) >= _FOLD_EVERY or self._pending_numel >= _FOLD_NUMEL:
                self._fold()
        if not self.log_weight_histograms or not getattr(pl_module, "weightings", None):
            return
        weights = getattr(pl_module, "last_sample_weights", None)
        indices = getattr(pl_module, "last_sample_indices", None)
        if weights is None or indices is None:
            return
        self._weights.append(weights.detach())
        self._weight_indices.append(indices.detach())

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records = self._pending_epoch_records
        if records is not None and int(records["epoch"]) == trainer.current_epoch:
            # a checkpoint from after the epoch's last batch but before its end (at validation's end): Lightning
            # resumes straight into this hook
            self._pending_epoch_records = None
            self._load_records(records, pl_module)
        self._end_epoch(trainer, trainer.current_epoch, epoch_end_step(trainer))

    def _end_epoch(self, trainer: Trainer, epoch: int, step: int) -> None:
        """``epoch``'s end values from its records, at ``step``: subset accuracies, weight means and histograms."""
        self._ended_epoch = epoch
        log = self._train_count_values(trainer) if self._counting else {}
        mask = self._noise_mask(trainer) if self._weights else None
        if mask is None:  # no weights (or no noise mask): the subset accuracies alone, in one row
            self._weights.clear()
            self._weight_indices.clear()
            self._publish(trainer, epoch, log, step=step)
            return
        weights = torch.cat(self._weights).float()
        noisy = mask.to(weights.device)[torch.cat(self._weight_indices).to(weights.device)]
        self._weights.clear()
        self._weight_indices.clear()
        sums = torch.stack([weights[noisy].sum(), noisy.sum(), weights[~noisy].sum(), (~noisy).sum()]).double()
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[1]) > 0:
            log[f"{self.prefix}/weight_mean_noisy"] = float(sums[0] / sums[1])
        if float(sums[3]) > 0:
            log[f"{self.prefix}/weight_mean_clean"] = float(sums[2] / sums[3])
        self._publish(trainer, epoch, log, step=step)  # one row with the subset accuracies
        log_histograms(
            trainer, {f"{self.prefix}/weights_noisy": weights[noisy], f"{self.prefix}/weights_clean": weights[~noisy]},
            step=step, epoch=epoch,
        )

    # ------------------------------------------------------------------ checkpointing
    def _epoch_records(self) -> dict[str, Any] | None:
        """The running epoch's unfinished records (a mid-epoch checkpoint): subset counts, weights seen."""
        if self._begun_epoch is None or self._begun_epoch == self._ended_epoch:
            return None  # none begun, or its end values are out already
        if self._counting:
            self._fold()
        trainer = self._trainer
        return {
            "epoch": self._begun_epoch,
            # where Lightning writes this epoch's end values if its batches are all done (a checkpoint at its last
            # batch or at validation's end: the last batch's step is not yet counted there)
            "end_step": None if trainer is None else log_step(trainer),
            "train_counts": None if self._train_counts is None else self._train_counts.detach().cpu().clone(),
            "weights": torch.cat([w.detach().cpu() for w in self._weights]) if self._weights else None,
            "indices": torch.cat([i.detach().cpu() for i in self._weight_indices]) if self._weights else None,
        }

    @staticmethod
    def _merged_records(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' records as one process's (a resume with another number of processes)."""
        counts = [torch.as_tensor(p["train_counts"]) for p in parts if p["train_counts"] is not None]
        return {**parts[0], "train_counts": torch.stack(counts).sum(0) if counts else None,
                "weights": cat_or_none([p["weights"] for p in parts]),
                "indices": cat_or_none([p["indices"] for p in parts])}

    @staticmethod
    def _empty_records(records: dict[str, Any]) -> dict[str, Any]:
        """``records`` with nothing counted or seen (another rank holds it), for the same epoch."""
        out = dict(records)
        if records["train_counts"] is not None:
            out["train_counts"] = torch.zeros_like(torch.as_tensor(records["train_counts"]))
        if records["weights"] is not None:
            out["weights"], out["indices"] = records["weights"][:0].clone(), records["indices"][:0].clone()
        return out

    def _restore_epoch_records(self, trainer: Trainer, pl_module: LightningModule) -> None:
        records, self._pending_epoch_records = self._pending_epoch_records, None
        if records is not None and int(records["epoch"]) == trainer.current_epoch:
            self._load_records(records, pl_module)

    def _close_checkpoint_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Publish the end values of the epoch a checkpoint from its last batch left unfinished.

        Lightning resumes such a checkpoint into the next epoch without running the saved epoch's end hook, so its
        subset accuracies, weight means and histograms are computed here, as training starts, from the
        checkpoint's records (at the step the uninterrupted run writes them at: the saved epoch's last batch).
        """
        records = self._pending_epoch_records
        if records is None or int(records["epoch"]) != trainer.current_epoch - 1:
            return
        self._pending_epoch_records = None
        self._counting = False
        self._load_records(records, pl_module)
        step = records.get("end_step")
        self._end_epoch(trainer, int(records["epoch"]), log_step(trainer) if step is None else int(step))
        self._counting, self._train_counts = False, None
        self._weights.clear()
        self._weight_indices.clear()

    def _load_records(self, records: dict[str, Any], pl_module: LightningModule) -> None:
        """Continue an epoch from a checkpoint's records: its subset counts and the weights seen so far."""
        if records.get("train_counts") is not None and self._hook is not None:
            self._counting = True
            self._train_counts = torch.as_tensor(records["train_counts"]).to(pl_module.device)
            self._pending.clear()
            self._pending_numel = 0
        if records.get("weights") is not None:
            self._weights[:] = [torch.as_tensor(records["weights"]).to(pl_module.device)]
            self._weight_indices[:] = [torch.as_tensor(records["indices"]).to(pl_module.device)]

    @override
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state for a checkpoint; under DDP a collective (call it on every rank, as Lightning does).

        Every rank's records of an unfinished epoch are gathered, so that each rank resumes its own.
        """
        return {
            "epoch_records": gather_records(self._trainer, self._epoch_records()),
            "seed": self.seed,
            "num_classes": self.num_classes,
            "batch_size": self.batch_size,
            "pool_size": self.pool_size,
            "pool_indices": None if self._pool_indices is None else self._pool_indices.clone(),
            "labels": None if self._labels is None else self._labels.clone(),
            "epochs": list(self._epochs),
            "drops": list(self._drops),
            "logged": [dict(d) for d in self._logged],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {"seed": state_dict["seed"], "pool_size": state_dict.get("pool_size", self.pool_size),
                 "batch_size": state_dict.get("batch_size", self.batch_size)}
        if self._num_classes_arg is not None and state_dict.get("num_classes") is not None:
            saved["num_classes"] = state_dict["num_classes"]
        own = {"seed": self.seed, "pool_size": self.pool_size, "batch_size": self.batch_size,
               "num_classes": self._num_classes_arg}
        changed = {k: (own[k], int(v)) for k, v in saved.items() if int(v) != own[k]}
        if changed:
            raise ValueError(
                "SusceptibilityMonitor: the checkpoint was measured with other settings "
                + ", ".join(f"{k}={was} (now {now})" for k, (now, was) in changed.items())
                + "; zeta would mix two measurements: resume with the same settings"
            )
        if state_dict.get("num_classes") is not None:
            self.num_classes = int(state_dict["num_classes"])
        labels = state_dict.get("labels")
        self._labels = None if labels is None else torch.as_tensor(labels).clone()
        indices = state_dict.get("pool_indices")
        self._pool_indices = None if indices is None else torch.as_tensor(indices).clone()
        self._pool = None
        self._epochs = [int(e) for e in state_dict.get("epochs", [])]
        self._begun_epoch = None
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self._pending_epoch_records = records_for_rank(
            state_dict.get("epoch_records"), rank, world, self._merged_records, self._empty_records
        )
        self._drops = [float(d) for d in state_dict.get("drops", [])]
        self._logged = [dict(d) for d in state_dict.get("logged", [])]
