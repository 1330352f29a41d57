"""The meta-net updater: a callback that reweights every training batch by a meta-gradient strategy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_reweight._layers import is_compiled
from lightning_reweight.callbacks._data import starts_new_run, train_dataset
from lightning_reweight.callbacks._records import cat_or_none, collective_world, gather_records, records_for_rank
from lightning_reweight.callbacks._schedule import warn_if_never_reached
from lightning_reweight.contract import ReweightingMixin, WeightingContext
from lightning_reweight.functional.susceptibility import needs_closure
from lightning_reweight.loggers import epoch_end_step, log_step, publish_metrics
from lightning_reweight.meta.base import MetaStrategy
from lightning_reweight.meta.engine import (
    FD_EPS,
    FD_SCALES,
    HYPERGRADS,
    FdScale,
    Hypergrad,
    MetaProblem,
    RNGState,
    capture_rng,
)
from lightning_reweight.metrics.weight_auroc import WeightNoiseAUROC, rank_auroc
from lightning_reweight.metrics.weight_history import SampleWeightHistory

__all__ = ["MetaReweight"]

_UNSUPPORTED = ("FSDP", "DeepSpeed")
_EMPTY = object()


class MetaReweight(Callback):
    """Reweight training samples by a meta-gradient strategy (L2RW, Meta-Weight-Net) against a clean meta set.

    Add it to an existing Trainer; the module keeps its own optimizer and automatic optimization. It must mix
    in :class:`~lightning_reweight.contract.ReweightingMixin` (``per_sample_loss`` + ``reweight``): the callback
    attaches itself as a weighting source, and on every ``meta_interval``-th step after ``warmup_epochs`` it
    draws a meta batch (cycling the meta loader), builds a :class:`~lightning_reweight.meta.MetaProblem` from the
    training forward's losses and lets the strategy turn it into weights. The meta loss is the mean of
    ``per_sample_loss`` on the meta batch. A strategy that needs only the alignment at ``theta`` (L2RW) has it
    prepared in ``on_train_batch_start``, before the training forward (less memory alive at once); the finite
    difference then takes ``l(theta)`` from the training forward. Between meta steps a stateful strategy (MW-Net)
    weights with its current meta-net; during warm-up weights are uniform. A *delayed* strategy
    (``MetaWeightNet(delayed=True)``) weights the batch with its current meta-net and runs its meta update in
    ``on_before_optimizer_step``, taking the virtual step from the real gradient (unscaled, not yet clipped; under
    DDP the ranks' average); it needs one backward per optimizer step: ``accumulate_grad_batches=1``, and under
    manual optimization no accumulation over batches (a batch without an optimizer step drops its meta update,
    with a warning). Optimizers whose step needs a closure (LBFGS) are refused: Lightning re-runs
    ``training_step`` inside the closure, which would run a meta step per re-evaluation.

    Exactness and side effects: extra forwards run on cloned buffers, in fp32 (autocast off), inside a forked
    RNG; the training batch's extra forwards replay the RNG state saved in ``on_train_batch_start``, which
    reproduces the training forward's dropout masks **provided the training forward is the first consumer of
    the RNG after that hook** (true for the usual ``training_step``). The meta loader is iterated inside a forked,
    seeded RNG, so it consumes nothing from the training RNG stream and its order is reproducible on resume.

    DDP: the meta gradient (L2RW) and the meta-net gradient (MW-Net) are averaged across ranks, the meta-net is
    broadcast from rank 0 at fit start, and nothing is differentiated through the DDP wrapper. FSDP and
    DeepSpeed are refused at setup.

    Args:
        strategy: an :class:`~lightning_reweight.meta.L2RW` or :class:`~lightning_reweight.meta.MetaWeightNet`.
        meta_dataloader: the clean meta loader yielding ``(x, y)``; default: ``trainer.datamodule.meta_dataloader()``.
        hypergrad: ``"finite_diff"`` (one extra forward), ``"forward"`` (exact JVP) or ``"second_order"``.
        meta_interval: run meta steps on every this many optimizer steps (1 for L2RW, which has no state); with
            ``accumulate_grad_batches > 1`` each batch accumulated into such a step gets its own meta step.
        warmup_epochs: epochs of uniform weights before the first meta step.
        virtual_lr: virtual-step size; default the optimizer's current lr (of its first parameter group, or the
            largest group lr when the first is 0). With several parameter groups each parameter's virtual step is
            scaled by its group's lr relative to that one, as the real step is; parameters the optimizer does not
            train (or trains at lr 0) are not moved. One optimizer only (several are refused at fit start).
        fd_eps: relative finite-difference step (default :data:`~lightning_reweight.meta.engine.FD_EPS`).
        fd_scale: ``"all"`` (default) or ``"moved"``: which parameters' norm scales the finite-difference step
            (``"moved"`` for models with large tables a batch barely touches, such as embeddings; a warning
            says when).
        meta_seed: seeds the shuffling of a meta loader that uses the global RNG (``shuffle=True`` without a
            ``generator``). A loader with its own ``generator`` (``ReweightDataModule.meta_dataloader()``) shuffles
            with it; its state at the start of the current meta epoch is checkpointed, so a resumed run draws the
            uninterrupted run's meta batches either way (under DDP, ranks above 0 reseed it per rank).
        track_noise_auroc: when the datamodule has a ``noise_mask`` and batches carry indices, accumulate the
            AUROC of the weights against it per epoch (logged as ``meta/weight_auroc``; not on clean data, where
            the mask has no noisy sample and the AUROC is undefined).
        track_sample_history: when batches carry dataset indices, keep every sample's weight history over the
            meta steps after warm-up (:class:`~lightning_reweight.metrics.SampleWeightHistory`; four float64
            numbers per training sample, saved in checkpoints): :meth:`sample_scores` ranks suspected noisy
            samples without clean labels, and with a ``noise_mask`` the AUROC of the cumulative score against it
            is logged each epoch as ``meta/sample_auroc``. Costs about 0.3 ms per meta step on CPU (2% of an L2RW
            step of the digits MLP, less on larger models; ``benchmarks/sample_history_cost.py``).
        plot_every_n_epochs: for a strategy with a ``weight_net`` (MW-Net), log the learned weight-vs-loss curve
            as a figure every this many epochs to loggers that accept images (TensorBoard, W&B); 0 disables.

    Example:
        >>> from lightning_reweight.meta import MetaWeightNet
        >>> cb = MetaReweight(MetaWeightNet(), hypergrad="forward", warmup_epochs=2)
        >>> cb.state_dict()["meta_steps"]
        0
    """

    def __init__(
        self,
        strategy: MetaStrategy,
        meta_dataloader: Any = None,
        hypergrad: Hypergrad = "finite_diff",
        meta_interval: int = 1,
        warmup_epochs: int = 0,
        virtual_lr: float | None = None,
        fd_eps: float = FD_EPS,
        fd_scale: FdScale = "all",
        meta_seed: int = 0,
        track_noise_auroc: bool = True,
        track_sample_history: bool = True,
        plot_every_n_epochs: int = 1,
    ) -> None:
        if not isinstance(strategy, MetaStrategy):
            raise TypeError(f"strategy must be a MetaStrategy (L2RW(), MetaWeightNet()), got {type(strategy).__name__}")
        if hypergrad not in HYPERGRADS:
            raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {hypergrad!r}")
        if meta_interval < 1:
            raise ValueError(f"meta_interval must be >= 1, got {meta_interval}")
        if meta_interval > 1 and not strategy.stateful:
            raise ValueError(
                f"{type(strategy).__name__} has no state between meta steps: use meta_interval=1 "
                "(or a stateful strategy such as MetaWeightNet)"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if virtual_lr is not None and virtual_lr <= 0:
            raise ValueError(f"virtual_lr must be positive (or None for the optimizer's lr), got {virtual_lr}")
        if isinstance(meta_dataloader, Dataset) or (
            meta_dataloader is not None and not hasattr(meta_dataloader, "__iter__")
        ):
            raise TypeError(
                f"meta_dataloader must be a loader of meta batches, got {type(meta_dataloader).__name__}; wrap a "
                "dataset in torch.utils.data.DataLoader(dataset, batch_size=..., shuffle=True)"
            )
        if isinstance(meta_dataloader, Iterator):
            raise TypeError(
                f"meta_dataloader must be re-iterable (it is cycled), got a one-shot {type(meta_dataloader).__name__}"
                "; pass the DataLoader itself, not iter(loader) or a generator"
            )
        self.strategy = strategy
        self.hypergrad = hypergrad
        self.meta_interval = meta_interval
        self.warmup_epochs = warmup_epochs
        self.virtual_lr = virtual_lr
        self.fd_eps = fd_eps
        if fd_scale not in FD_SCALES:
            raise ValueError(f"fd_scale must be one of {FD_SCALES}, got {fd_scale!r}")
        self.fd_scale = fd_scale
        self.meta_seed = meta_seed
        self.track_noise_auroc = track_noise_auroc
        self.track_sample_history = track_sample_history
        self.plot_every_n_epochs = plot_every_n_epochs
        self._user_meta_loader = meta_dataloader
        self._meta_loader = meta_dataloader
        self._trainer: L.Trainer | None = None
        self._noise_mask: Tensor | None = None
        self._noise_mask_device: Tensor | None = None
        self._auroc = WeightNoiseAUROC()
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Counters, meta-loader position, pending work and weight records of one run (the strategy is kept)."""
        self._meta_iter: Iterator[Any] | None = None
        self._meta_epoch = 0
        self._meta_pos = 0
        # a meta loader with its own shuffle generator (ReweightDataModule's): its state when the current meta
        # epoch began, checkpointed, and whether the next meta epoch start must restore it (after a load)
        self._meta_gen_state: Tensor | None = None
        self._restore_meta_gen = False
        self._meta_steps = 0
        self._warned_dropped = False
        self._lr_scale_cache: tuple[Any, list[float] | None] | None = None
        self._rng: RNGState | None = None
        self._buffers: dict[str, Tensor] | None = None
        self._pending: tuple[MetaProblem, float] | None = None
        self._early: MetaProblem | None = None
        self._losses_checked = False  # per fit: the training forward's losses against per_sample_loss, once
        self._pending_extra: dict[str, Any] | None = None
        self._auroc.reset()
        self.auroc_history: list[float] = []
        self._history: SampleWeightHistory | None = None
        self.sample_auroc_history: list[float] = []
        self._epoch_batches = 0  # training batches seen in the current epoch ...
        self._reweight_calls = 0  # ... and sample_weights calls among them
        self._pending_epoch_records: dict[str, Any] | None = None  # a mid-epoch checkpoint's, until its epoch runs
        self._ended_epoch: int | None = None  # the last epoch whose end values were computed

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if any(bad in name for name in names for bad in _UNSUPPORTED):
            raise RuntimeError(
                f"MetaReweight does not support {type(trainer.strategy).__name__}: the meta step needs the full, "
                "unsharded parameters. Use strategy='ddp' (or a single device)."
            )
        if not (hasattr(pl_module, "attach_weighting") and hasattr(pl_module, "per_sample_loss")):
            raise TypeError(
                f"{type(pl_module).__name__} must mix in lightning_reweight.ReweightingMixin (implement "
                "per_sample_loss(batch) and return self.reweight(losses, batch) from training_step)"
            )
        self._check_accumulation(trainer)
        if starts_new_run(trainer):
            # a new run (a checkpoint being resumed is loaded after this hook and overwrites it)
            self._reset_run_state()
        if self._user_meta_loader is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "meta_dataloader"):
                raise ValueError(
                    "MetaReweight needs clean meta data: pass meta_dataloader=... or use a datamodule with "
                    "meta_dataloader() (e.g. lightning_reweight.data.DigitsDataModule)"
                )
            self._meta_loader = dm.meta_dataloader()
            self._meta_iter = None
            self._restore_meta_gen = self._meta_gen_state is not None  # a continued fit: the new loader resumes
        if self.track_noise_auroc or self.track_sample_history:
            mask = getattr(getattr(trainer, "datamodule", None), "noise_mask", None)
            mask = None if mask is None else torch.as_tensor(mask).bool().cpu()
            # clean data (or all noisy): an AUROC against one class is undefined; log none rather than nan
            self._noise_mask = None if mask is None or not mask.any() or bool(mask.all()) else mask
            self._noise_mask_device = None
        self._trainer = trainer
        cast(ReweightingMixin, pl_module).attach_weighting(type(self).__name__, self)

    def _check_accumulation(self, trainer: L.Trainer) -> None:
        """A delayed strategy refuses gradient accumulation.

        Checked at setup and at every batch, since ``GradientAccumulationScheduler`` raises
        ``accumulate_grad_batches`` at the start of an epoch.
        """
        if self.strategy.delayed and trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"a delayed {type(self.strategy).__name__} reuses one batch's gradient for its virtual step: it "
                f"does not work with accumulate_grad_batches={trainer.accumulate_grad_batches} (epoch "
                f"{trainer.current_epoch}; set by the Trainer or a GradientAccumulationScheduler): use delayed=False"
            )

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # teardown does not run after an exception: leave the module as it was given
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(pl_module, "detach_weighting"):
            cast(ReweightingMixin, pl_module).detach_weighting(type(self).__name__)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"MetaReweight needs exactly one optimizer (its parameter groups set the virtual step), got "
                f"{len(trainer.optimizers)}: put the parameters in one optimizer with a parameter group each"
            )
        if needs_closure(trainer.optimizers[0]):
            raise ValueError(
                f"MetaReweight cannot drive {type(trainer.optimizers[0]).__name__}: its step needs a closure, and "
                "Lightning re-runs training_step inside it, so every re-evaluation would run a meta step (and MW-Net "
                "a meta update) with a new meta batch. Use a first-order optimizer (SGD, Adam, ...)"
            )
        if self.hypergrad == "second_order" and any(is_compiled(m) for m in pl_module.modules()):
            raise ValueError(  # the engine refuses it too, at the first meta step: here before any training
                "MetaReweight(hypergrad='second_order') backpropagates through a backward, which torch.compile'd "
                "code does not support: use hypergrad='finite_diff' with a compiled model"
            )
        low = {p.dtype for p in pl_module.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
        if low and self.hypergrad == "finite_diff":
            rank_zero_warn(
                f"MetaReweight: the model's parameters are {sorted(map(str, low))[0]}, where the finite difference "
                "theta + h d is rounded to 8-11 bits and its alignment is inaccurate; use hypergrad='forward' "
                "(exact at any precision) or a mixed precision (bf16-mixed keeps fp32 parameters)"
            )
        self._losses_checked = False
        self.strategy.to(pl_module.device)
        self._auroc.to(pl_module.device)
        if self._history is not None:
            self._history.to(pl_module.device)
        if self._pending_extra is not None:  # after .to(device): optimizer state follows the parameters
            self.strategy.load_extra_state(self._pending_extra)
            self._pending_extra = None
        if trainer.world_size > 1 and self.strategy.stateful:
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in self.strategy.state_dict().items()}, src=0)
            self.strategy.load_state_dict(state)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup_epochs > 0:  # here: the epoch length (for max_steps) is known from now on
            warn_if_never_reached(trainer, self.warmup_epochs, "MetaReweight (no meta step)", "warmup_epochs")
        if self._pending_epoch_records is not None:
            self._restore_epoch_records(trainer)

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._check_accumulation(trainer)
        self._rng = capture_rng(pl_module.device)
        meta_step = self._meta_step_now(trainer)
        # the buffers as the training forward finds them (replays must not see its in-place updates)
        self._buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()} if meta_step else None
        self._early = None
        if self.strategy.early_alignment and meta_step:
            # the alignment's meta forward/backward and shifted forward, before the training graph exists
            self._early = self._problem(trainer, pl_module, batch, None)
            self._early.prepare()

    def _meta_step_now(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch >= self.warmup_epochs and trainer.global_step % self.meta_interval == 0

    def sample_weights(self, losses: Tensor, context: WeightingContext) -> Tensor:
        """The weights of this training batch (the :class:`~lightning_reweight.contract.SampleWeighting` hook)."""
        trainer = self._trainer
        ones = torch.ones_like(losses, dtype=torch.float32)
        if trainer is None or not trainer.training:
            return ones
        self._reweight_calls += 1
        if context.batch is None:
            raise ValueError(
                "MetaReweight needs the training batch: return self.reweight(losses, batch) from training_step"
            )
        if trainer.current_epoch < self.warmup_epochs:
            return ones
        module = context.module
        if not self._meta_step_now(trainer):
            return self.strategy.weights(losses.detach())
        delayed = self.strategy.delayed
        early, self._early = self._early, None
        if early is not None and early.train_batch is context.batch:
            problem = early
            problem.attach_losses(losses)
        else:  # training_step handed over another batch object than the hook saw: start afresh (same meta batch)
            problem = self._problem(trainer, module, context.batch, losses.detach() if delayed else losses,
                                    None if early is None else early.meta_batch)
        if not self._losses_checked:  # once per fit: the meta step assumes losses == per_sample_loss(batch)
            self._losses_checked = True
            self._check_losses(trainer, problem, losses)
        if delayed:  # weights of the current meta-net; its update waits for the real gradient (counted there)
            weights = self.strategy.weights(losses.detach())
            self._pending = (problem, self._virtual_lr(trainer))
        else:
            weights = self.strategy.meta_weights(problem, self._virtual_lr(trainer)).detach()
            self._meta_steps += 1
        if context.indices is not None:
            if self.track_noise_auroc and self._noise_mask is not None:
                self._auroc.update(weights, self._noise_mask_on(weights.device)[context.indices.to(weights.device)])
            if self.track_sample_history:
                history = self._sample_history(trainer, weights.device)
                try:
                    history.update(weights, context.indices)
                except ValueError as err:
                    raise ValueError(
                        f"MetaReweight(track_sample_history=True): {err}. The batches' third element must index "
                        "the training set itself (a Subset or random_split of an IndexedDataset keeps the whole "
                        "pool's indices: wrap the subset instead, IndexedDataset(subset)), or pass "
                        "track_sample_history=False"
                    ) from err
        return weights

    def _check_losses(self, trainer: L.Trainer, problem: MetaProblem, losses: Tensor) -> None:
        """Raise when the losses handed to ``reweight`` are not ``per_sample_loss(batch)`` (on any rank).

        Only where the meta step uses them: finite differences (``l(theta)``) and strategies whose weights are a
        function of the losses (MW-Net); L2RW's exact routes evaluate ``per_sample_loss`` alone.
        """
        if self.strategy.early_alignment and self.hypergrad != "finite_diff":
            return
        gap = trainer.strategy.reduce(problem.loss_gap(losses), reduce_op="max")  # every rank decides alike
        if float(gap) > problem.loss_tolerance(losses):  # a nan gap (diverged losses) is not this error
            raise ValueError(
                "MetaReweight: the losses handed to reweight() are not per_sample_loss(batch) replayed at the same "
                f"parameters (largest difference {float(gap):.3g} of the largest loss), and the meta step needs one "
                "function for both. Either training_step reduces other losses than per_sample_loss(batch) through "
                "reweight (hand it exactly per_sample_loss(batch) and add other terms outside: "
                "self.reweight(self.per_sample_loss(batch), batch) + aux_loss), or per_sample_loss draws random "
                "numbers MetaReweight cannot replay (NumPy, Python's random: use torch's generator), or something "
                "draws torch random numbers or switches train/eval modes between on_train_batch_start, where the "
                "RNG is saved, and the training forward (e.g. the LightningModule's own on_train_batch_start, which "
                "Lightning runs after the callbacks': use on_train_epoch_start or on_before_batch_transfer)"
            )

    def _problem(
        self, trainer: L.Trainer, module: Any, batch: Any, losses: Tensor | None, meta_batch: Any = None
    ) -> MetaProblem:
        """This step's meta problem: the training batch, the meta batch (default: the next one), the saved RNG."""
        if meta_batch is None:
            # as Lightning prepares a training batch: the precision's input dtype (64-true, bf16-true), the device
            meta_batch = trainer.precision_plugin.convert_input(self._next_meta_batch(trainer))
            meta_batch = move_data_to_device(meta_batch, module.device)
        return MetaProblem(
            module,
            module.per_sample_loss,
            lambda b: module.per_sample_loss(b).mean(),
            batch,
            meta_batch,
            hypergrad=self.hypergrad,
            losses=losses,
            rng_state=self._rng,
            buffers=self._buffers,
            fd_eps=self.fd_eps,
            fd_scale=self.fd_scale,
            lr_scale=self._lr_scale(trainer, module),
            reduce=self._all_reduce if trainer.world_size > 1 else None,
            # not under fp16 autocast with a GradScaler: a backward through that graph would run unscaled
            reuse_graph=trainer.world_size == 1 and not self.strategy.delayed and self._scaler(trainer) is None,
        )

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """A delayed strategy's meta update, with the real step's gradient (unscaled, not yet clipped)."""
        if self._pending is None:
            return
        problem, lr = self._pending
        self._pending = None
        grads = [p.grad for p in problem.params]
        scaler = self._scaler(trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # a fused optimizer unscales inside its own step: the gradients here still carry the loss scale
            inv = 1.0 / float(scaler.get_scale())
            grads = [None if g is None else g * inv for g in grads]
        present = [g for g in grads if g is not None]
        if present and not bool(torch.stack([torch.isfinite(g).all() for g in present]).all()):  # one sync
            return  # an fp16 overflow: the optimizer skips this step, and so does the meta-net
        self.strategy.meta_update(problem, lr, grads)
        self._meta_steps += 1

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and not pl_module.automatic_optimization and not self._warned_dropped:
            self._warned_dropped = True
            rank_zero_warn(
                f"a delayed {type(self.strategy).__name__} ran no meta update for batch {batch_idx}: no optimizer "
                "step followed its backward (a skipped batch, or gradients accumulated by hand). If training_step "
                "accumulates gradients over batches, the next meta update takes its virtual step from the "
                "accumulated gradient of several batches: use delayed=False"
            )
        self._pending = None  # a step without an optimizer step (skipped loss) drops its delayed meta update
        self._early = None
        self._epoch_batches += 1  # here, not at batch start: the module's own hook may skip the batch

    def _noise_mask_on(self, device: torch.device) -> Tensor:
        """The noise mask on ``device``, copied there once (indexing it then needs no host round trip per step)."""
        assert self._noise_mask is not None
        cached = self._noise_mask_device
        if cached is None or cached.device != device:
            cached = self._noise_mask_device = self._noise_mask.to(device)
        return cached

    def _sample_history(self, trainer: L.Trainer, device: torch.device) -> SampleWeightHistory:
        if self._history is None:
            dataset = train_dataset(trainer)
            if dataset is None:
                raise ValueError(
                    "MetaReweight(track_sample_history=True) needs the training set's length "
                    "(trainer.datamodule.train_dataset or trainer.train_dataloader.dataset); pass "
                    "track_sample_history=False"
                )
            self._history = SampleWeightHistory(len(dataset)).to(device)
        return self._history

    def sample_scores(self) -> dict[str, Tensor] | None:
        """Every training sample's weight history since warm-up (``None`` before the first meta step).

        The dict of :class:`~lightning_reweight.metrics.SampleWeightHistory`, indexed by dataset index:
        ``"percentile"`` (mean within-batch percentile of the sample's weights; low = suspected noisy label),
        ``"mean_weight"``, ``"positive_share"`` and ``"visits"``. Under DDP, summed over ranks (a collective:
        call it on every rank).
        """
        return None if self._history is None else self._history.compute()

    def _sample_aurocs(self) -> dict[str, float]:
        """AUROC of each history score against the noise mask (empty without a history or a matching mask)."""
        history, mask = self._history, self._noise_mask
        if history is None or mask is None or len(mask) != history.num_samples:
            return {}
        scores = {k: v.cpu() for k, v in history.compute().items()}
        seen = scores.pop("visits") > 0
        return {key: float(rank_auroc(score[seen], ~mask[seen])) for key, score in scores.items()}

    @staticmethod
    def _scaler(trainer: L.Trainer) -> Any:
        """The precision plugin's GradScaler (fp16 mixed precision), or ``None``."""
        return getattr(trainer.precision_plugin, "scaler", None)

    @staticmethod
    def _base_lr(groups: list[dict[str, Any]]) -> float:
        """The optimizer's lr the virtual step is measured in: the first group's, or the largest if that is 0."""
        first = float(groups[0]["lr"])
        return first if first > 0 else max(float(g["lr"]) for g in groups)

    def _virtual_lr(self, trainer: L.Trainer) -> float:
        if self.virtual_lr is not None:
            return self.virtual_lr
        return self._base_lr(trainer.optimizers[0].param_groups)

    def _lr_scale(self, trainer: L.Trainer, module: Any) -> list[float] | None:
        """Each trainable parameter's lr relative to the base lr (:meth:`_base_lr`; 0: not trained by the optimizer).

        ``None`` when they are all 1, as with a single group holding every trainable parameter. Cached while the
        optimizer, its groups' lrs and the set of trainable parameters stay the same.
        """
        optimizer = trainer.optimizers[0]
        groups = optimizer.param_groups
        trainable = [p for p in module.parameters() if p.requires_grad]
        key = (id(optimizer), tuple(float(g["lr"]) for g in groups), tuple(id(p) for p in trainable))
        if self._lr_scale_cache is not None and self._lr_scale_cache[0] == key:
            return self._lr_scale_cache[1]
        if all(float(g["lr"]) <= 0 for g in groups):
            # a warm-up step at lr 0: the groups' ratios are those of their initial lrs (schedulers record them)
            groups = [{**g, "lr": float(g.get("initial_lr", 1.0))} for g in groups]
        base = self._base_lr(groups)
        lr_of = {id(p): float(g["lr"]) for g in groups for p in g["params"]}
        ratios = [lr_of.get(id(p), 0.0) / base if base > 0 else 1.0 for p in trainable]
        scale = None if all(r == 1.0 for r in ratios) else ratios
        self._lr_scale_cache = (key, scale)
        return scale

    def _all_reduce(self, tensors: list[Tensor]) -> list[Tensor]:
        trainer = self._trainer
        assert trainer is not None
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        flat = trainer.strategy.reduce(flat, reduce_op="mean")
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
            start += t.numel()
        return out

    def _next_meta_batch(self, trainer: L.Trainer) -> Any:
        with torch.random.fork_rng(devices=[]):
            if self._meta_iter is None:
                self._meta_iter = self._start_meta_epoch(trainer, skip=self._meta_pos)
            try:
                batch = next(self._meta_iter)
            except StopIteration:
                self._meta_epoch += 1
                self._meta_pos = 0
                self._meta_iter = self._start_meta_epoch(trainer, skip=0)
                batch = next(self._meta_iter, _EMPTY)
                if batch is _EMPTY:  # a StopIteration escaping here would end Lightning's epoch silently
                    raise RuntimeError(
                        "MetaReweight: the meta loader yielded no batch (a meta set smaller than its batch size "
                        "with drop_last=True, or an empty one): give it at least one batch"
                    ) from None
        self._meta_pos += 1
        return batch

    def _start_meta_epoch(self, trainer: L.Trainer, skip: int) -> Iterator[Any]:
        # the CPU generator only (inside fork_rng(devices=[])): torch.manual_seed would reseed the CUDA generators
        # too, and nothing restores those, so the training forward's dropout masks would follow the meta epochs
        seed = self.meta_seed + 7919 * self._meta_epoch + 104729 * trainer.global_rank
        torch.random.default_generator.manual_seed(seed)
        gen = getattr(getattr(self._meta_loader, "sampler", None), "generator", None)  # the order's generator
        if not isinstance(gen, torch.Generator):
            gen = getattr(self._meta_loader, "generator", None)
        if isinstance(gen, torch.Generator):  # the loader shuffles with its own generator, not the global RNG
            if self._restore_meta_gen and self._meta_gen_state is not None:
                gen.set_state(self._meta_gen_state)  # resuming: the checkpointed meta epoch's order
            elif self._meta_gen_state is None and trainer.global_rank:
                gen.manual_seed(gen.initial_seed() + 104729 * trainer.global_rank)  # other meta batches per rank
            self._meta_gen_state = gen.get_state()
        self._restore_meta_gen = False
        it = iter(self._meta_loader)  # type: ignore[arg-type]
        for _ in range(skip):
            next(it)
        return it

    # ------------------------------------------------------------------ epoch end: AUROC, figure
    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batches, calls, self._epoch_batches, self._reweight_calls = self._epoch_batches, self._reweight_calls, 0, 0
        if trainer.current_epoch == self._ended_epoch:
            return  # Lightning re-runs the end of an epoch whose checkpoint was saved after it (max_steps runs)
        if batches and not calls:
            raise RuntimeError(
                f"MetaReweight: {type(pl_module).__name__}.training_step never called self.reweight(losses, batch) "
                f"in epoch {trainer.current_epoch}, so no sample was reweighted (and the meta steps prepared "
                "before each batch were wasted): reduce the per-sample losses with self.reweight(losses, batch)"
            )
        for key, value in self._end_epoch(trainer, trainer.current_epoch, epoch_end_step(trainer)).items():
            self._log_synced(pl_module, key, value)

    def _end_epoch(self, trainer: L.Trainer, epoch: int, step: int) -> dict[str, float]:
        """``epoch``'s end: the weights' AUROC and the sample-history AUROC (returned), the weighting figure."""
        self._ended_epoch = epoch
        values = {}
        if self.track_noise_auroc and self._noise_mask is not None and epoch >= self.warmup_epochs:
            if trainer.world_size > 1 or self._auroc.weights:
                value = float(self._auroc.compute())
                self.auroc_history.append(value)
                values["meta/weight_auroc"] = value
        self._auroc.reset()
        aurocs = self._sample_aurocs()
        if aurocs:
            self.sample_auroc_history.append(aurocs["percentile"])
            values["meta/sample_auroc"] = aurocs["percentile"]
        every = self.plot_every_n_epochs
        if every > 0 and (epoch + 1) % every == 0 and hasattr(self.strategy, "weight_net"):
            self._log_weight_function(trainer, epoch, step)
        return values

    def _close_checkpoint_epoch(self, trainer: L.Trainer, records: dict[str, Any]) -> None:
        """Publish the end values of the epoch a checkpoint from its last batch left unfinished.

        Lightning resumes such a checkpoint into the next epoch without running the saved epoch's end hook; its
        values are computed here, as training starts, from the checkpoint's records and written straight to the
        loggers, at the step the uninterrupted run writes them at (the saved epoch's last batch).
        """
        epoch, step = int(records["epoch"]), records.get("end_step")
        step = log_step(trainer) if step is None else int(step)
        self._load_records(records, trainer)
        publish_metrics(trainer, self._end_epoch(trainer, epoch, step), epoch=epoch, step=step)
        self._epoch_batches = self._reweight_calls = 0  # the resumed epoch starts afresh

    @staticmethod
    def _log_synced(pl_module: L.LightningModule, key: str, value: float) -> None:
        """Log an epoch value that is already the same on every rank.

        The max over ranks is the value itself, exactly, and Lightning no longer warns under DDP that an
        epoch-level value is logged without ``sync_dist``.
        """
        pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")

    @rank_zero_only
    def _log_weight_function(self, trainer: L.Trainer, epoch: int, step: int) -> None:
        from lightning_reweight.callbacks._plots import log_weight_function

        log_weight_function(trainer, self.strategy, epoch=epoch, step=step)

    def benchmark_metrics(self) -> dict[str, Any]:
        """Figures for the benchmark record.

        The weight AUROC of the last epoch and its post-warm-up mean; the AUROC against the noise mask of each
        per-sample history score (the whole run after warm-up), as ``sample_auroc_<score>``.
        """
        hist = [h for h in self.auroc_history if h == h]
        return {
            "weight_auroc": hist[-1] if hist else None,
            "weight_auroc_mean": sum(hist) / len(hist) if hist else None,
            "meta_steps": self._meta_steps,
            "hypergrad": self.hypergrad,
            "fd_eps": self.fd_eps if self.hypergrad == "finite_diff" else None,
            **{f"sample_auroc_{key}": value for key, value in self._sample_aurocs().items()},
        }

    # ------------------------------------------------------------------ checkpoint
    def _epoch_records(self) -> dict[str, Any] | None:
        """The current epoch's unfinished records (a mid-epoch checkpoint): weights seen for the AUROC, counters."""
        if self._trainer is None or not (self._epoch_batches or self._auroc.weights):
            return None
        cat = (lambda ts: torch.cat([t.detach().cpu() for t in ts]) if ts else None)  # noqa: E731
        return {
            "epoch": int(self._trainer.current_epoch),
            # where Lightning writes this epoch's end values if its batches are all done (a checkpoint at its last
            # batch or at validation's end: the last batch's step is not yet counted there)
            "end_step": log_step(self._trainer),
            "batches": self._epoch_batches,
            "calls": self._reweight_calls,
            "weights": cat(self._auroc.weights),
            "noisy": cat(self._auroc.noisy),
        }

    @staticmethod
    def _merged_records(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several ranks' records as one process's (a resume with another number of processes)."""
        return {**parts[0], "weights": cat_or_none([p["weights"] for p in parts]),
                "noisy": cat_or_none([p["noisy"] for p in parts])}

    @staticmethod
    def _empty_records(records: dict[str, Any]) -> dict[str, Any]:
        """``records`` with no weight seen (another rank holds them), its counters kept."""
        out = dict(records)
        if records["weights"] is not None:
            out["weights"], out["noisy"] = records["weights"][:0].clone(), records["noisy"][:0].clone()
        return out

    def _restore_epoch_records(self, trainer: L.Trainer) -> None:
        records, self._pending_epoch_records = self._pending_epoch_records, None
        if records is None:
            return
        # a mid-epoch checkpoint, or one from after the epoch's last batch but before its end hook (at validation's
        # end): the epoch goes on, or Lightning runs its end hook next
        if int(records["epoch"]) == trainer.current_epoch:
            self._load_records(records, trainer)
        elif int(records["epoch"]) == trainer.current_epoch - 1:  # from its last batch: Lightning skips its end
            self._close_checkpoint_epoch(trainer, records)

    def _load_records(self, records: dict[str, Any], trainer: L.Trainer) -> None:
        """Continue an epoch from a checkpoint's records: its counters and the weights seen for its AUROC."""
        self._epoch_batches = int(records["batches"])
        self._reweight_calls = int(records["calls"])
        if records.get("weights") is not None:
            self._auroc.reset()
            device = trainer.strategy.root_device
            self._auroc.update(records["weights"].to(device), records["noisy"].to(device))

    @override
    def state_dict(self) -> dict[str, Any]:
        """The meta state for a checkpoint; under DDP a collective (call it on every rank, as Lightning does)."""
        # Lightning saves rank 0's state dict; the per-rank parts are gathered first (collective_world): each
        # rank's meta-loader order, sample-history sums and unfinished epoch's records
        trainer = self._trainer
        world = collective_world(trainer)
        gen_states = self._meta_gen_state
        history: dict[str, Any] | None = None  # with "per_rank": True once gathered
        if self._history is not None:
            history = self._history.metric_state_cpu()
        if world > 1 and trainer is not None:
            if gen_states is not None:
                gathered = trainer.strategy.all_gather(gen_states.to(trainer.strategy.root_device, torch.long))
                gen_states = gathered.cpu().to(torch.uint8)  # (world, n): row r is rank r's
            if history is not None:  # (world, n, k): row r is rank r's sums
                gathered = trainer.strategy.all_gather(history["sums"].to(trainer.strategy.root_device))
                history = {"sums": gathered.cpu(), "per_rank": True}
        return {
            "epoch_records": gather_records(trainer, self._epoch_records()),
            "ended_epoch": self._ended_epoch,
            "strategy": {k: v.detach().cpu() for k, v in self.strategy.state_dict().items()},
            "strategy_extra": self.strategy.extra_state(),
            "meta_steps": self._meta_steps,
            "meta_epoch": self._meta_epoch,
            "meta_pos": self._meta_pos,
            "meta_generator_state": gen_states,
            "auroc_history": list(self.auroc_history),
            "sample_auroc_history": list(self.sample_auroc_history),
            "sample_history": history,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = self._trainer.global_rank if self._trainer is not None else 0
        world = self._trainer.world_size if self._trainer is not None else 1
        self.strategy.load_state_dict(state_dict["strategy"])
        self._pending_extra = state_dict.get("strategy_extra") or None
        self._meta_steps = int(state_dict["meta_steps"])
        self._meta_epoch = int(state_dict["meta_epoch"])
        self._meta_pos = int(state_dict["meta_pos"])
        self._pending_epoch_records = records_for_rank(
            state_dict.get("epoch_records"), rank, world, self._merged_records, self._empty_records
        )
        ended = state_dict.get("ended_epoch")
        self._ended_epoch = None if ended is None else int(ended)
        gen_state = state_dict.get("meta_generator_state")
        if gen_state is not None:
            gen_state = torch.as_tensor(gen_state, dtype=torch.uint8)
            if gen_state.dim() == 1:  # one process's state: rank 0's; the other ranks reseed as a new run does
                gen_state = gen_state if rank == 0 else None
            else:  # one row per rank (saved under DDP); ranks beyond them reseed
                gen_state = gen_state[rank] if rank < gen_state.shape[0] else None
        self._meta_gen_state = None if gen_state is None else gen_state.clone()
        self._restore_meta_gen = gen_state is not None
        self.auroc_history = list(state_dict.get("auroc_history", []))
        self.sample_auroc_history = list(state_dict.get("sample_auroc_history", []))
        history = state_dict.get("sample_history")
        if history is not None and history.get("per_rank"):  # saved under DDP: one row of sums per rank
            sums = torch.as_tensor(history["sums"])
            # the same number of processes: each rank its own sums (the uninterrupted run's order of additions);
            # another: rank 0 all of them, the others none (the next collective adds them up again)
            own = sums[rank] if sums.shape[0] == world else (sums.sum(0) if rank == 0 else torch.zeros_like(sums[0]))
            history = {"sums": own}
        elif history is not None and world > 1 and rank > 0:
            # one process's sums, or every rank's summed (older checkpoints): rank 0 holds them
            history = {"sums": torch.zeros_like(torch.as_tensor(history["sums"]))}
        self._history = None if history is None else SampleWeightHistory.from_state(history)
        self._meta_iter = None
