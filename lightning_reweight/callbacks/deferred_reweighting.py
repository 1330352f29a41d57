"""DRW: deferred re-weighting (Cao et al. 2019): unit class weights, then class-balanced weights from an epoch on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_reweight.callbacks._data import starts_new_run
from lightning_reweight.callbacks._schedule import warn_if_never_reached
from lightning_reweight.contract import ReweightingMixin, WeightingContext, mean_scale
from lightning_reweight.functional.longtail import check_class_counts, class_balanced_weights
from lightning_reweight.losses._counts import ClassCountLoss

__all__ = ["ClassWeighting", "DeferredReweighting"]

_MODES = ("weighting", "criterion")
#: the attribute of a criterion holding the class weights a DeferredReweighting wrote last (not its own weights)
_WRITTEN = "_drw_written_weights"


class ClassWeighting:
    """A weighting source giving PyTorch's class-weighted mean: ``w_i = c_{y_i} * B / sum_j c_{y_j}``.

    With these mean-scale weights, ``mean(w * l) = sum(c_y l) / sum(c_y)``, exactly what
    ``cross_entropy(..., weight=c)`` computes per batch.

    A batch made only of zero-weight classes gets all-zero weights (a zero loss) where PyTorch's weighted mean
    would give ``nan``.

    Args:
        class_weights: one non-negative weight per class, shape ``(C,)``, with a positive sum.

    Raises:
        ValueError: for weights that are not 1-D, finite and non-negative with a positive sum.

    Example:
        >>> import torch
        >>> from lightning_reweight.contract import WeightingContext
        >>> src = ClassWeighting(torch.tensor([1.0, 3.0]))
        >>> src.sample_weights(torch.ones(2), WeightingContext(None, targets=torch.tensor([0, 1])))
        tensor([0.5000, 1.5000])
    """

    def __init__(self, class_weights: Tensor | Sequence[float]) -> None:
        weights = torch.as_tensor(class_weights, dtype=torch.float32).detach()
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError(f"class_weights must have shape (C,), got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError(f"class_weights must be finite and non-negative with a positive sum, got {weights}")
        self.class_weights = weights
        self.calls = 0  # batches weighted (DeferredReweighting checks that training_step used it)

    def sample_weights(self, losses: Tensor, context: WeightingContext) -> Tensor:
        """Mean-scale weights of the batch's targets."""
        if context.targets is None:
            if context.batch is None:
                raise ValueError(
                    "class weighting needs the batch's targets: return self.reweight(losses, batch) from training_step"
                )
            raise ValueError("class weighting needs the batch's targets: batches must be (inputs, targets[, indices])")
        targets = context.targets.long()
        if targets.shape != losses.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and losses {tuple(losses.shape)} must have one shape")
        self.calls += 1
        # on CPU every batch; on a GPU the first (a host sync; an out-of-range index there is a device-side assert)
        if targets.numel() and (targets.device.type == "cpu" or self.calls == 1):
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= self.class_weights.numel():
                raise ValueError(
                    f"a target of class {high if high >= self.class_weights.numel() else low} but class weights for "
                    f"{self.class_weights.numel()} classes (0-{self.class_weights.numel() - 1}): give one count per "
                    "class of the data"
                )
        if self.class_weights.device != losses.device:  # once: a copy to the GPU per step would stall it
            self.class_weights = self.class_weights.to(losses.device)
        return mean_scale(self.class_weights[targets])


class DeferredReweighting(Callback):
    """Unit class weights before ``start_epoch``, class-balanced weights from it on (DRW).

    The class-balanced weights are :func:`~lightning_reweight.functional.class_balanced_weights`
    (``(1 - beta) / (1 - beta^n_j)``, summing to ``C``). Class counts come from ``cls_num_list`` or, when it is
    ``None``, from ``trainer.datamodule.train_class_counts``. Two ways to apply them:

    - ``mode="weighting"`` (default): attach a :class:`ClassWeighting` source to the module (it must use
      :class:`~lightning_reweight.contract.ReweightingMixin`); the training loss is then exactly PyTorch's
      class-weighted mean ``sum(c_y l) / sum(c_y)`` per batch. Before ``start_epoch`` nothing is attached.
    - ``mode="criterion"``: write the weights into the class-weight buffer of ``pl_module.criterion`` (or of
      ``pl_module.criterion.base_loss`` when the criterion wraps a base loss, e.g. ABSGD's attentional loss, so
      the class weight multiplies the loss inside the exponential), and ones before ``start_epoch``. With a
      ``reduction="none"`` criterion the per-sample losses are ``c_y l``; the batch mean is then
      ``sum(c_y l) / B``, not the weighted mean.

    The state is a function of the epoch (applied in ``on_train_start`` and ``on_train_epoch_start``), so a run
    resumed from a checkpoint taken on either side of ``start_epoch``, at an epoch's end or in its middle, continues
    with the weights of the uninterrupted run. Counts read from the datamodule are read again for every ``fit``
    (a reused callback follows the new dataset). In ``mode="weighting"``, an epoch whose ``training_step`` never
    called ``self.reweight`` is an error (the weights would silently not apply).

    Args:
        start_epoch: first epoch (0-based) with class-balanced weights (160 of 200 on CIFAR in the paper).
        beta: the effective-number parameter, in ``[0, 1)``.
        mode: ``"weighting"`` or ``"criterion"``.
        cls_num_list: training count of every class (default: the datamodule's ``train_class_counts``).

    Example:
        >>> cb = DeferredReweighting(start_epoch=160, beta=0.9999, cls_num_list=[500, 50, 5])
        >>> cb.class_weights().round(decimals=3)
        tensor([0.0280, 0.2710, 2.7020])
    """

    def __init__(
        self,
        start_epoch: int,
        beta: float = 0.9999,
        mode: Literal["weighting", "criterion"] = "weighting",
        cls_num_list: Sequence[int] | None = None,
    ) -> None:
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.start_epoch = int(start_epoch)
        self.beta = float(beta)
        self.mode = mode
        self._counts_given = cls_num_list is not None
        self._counts: list[int] | None = None if cls_num_list is None else self._validated(cls_num_list)
        self._active = False
        self._source: ClassWeighting | None = None
        self._epoch_batches = 0

    @staticmethod
    def _validated(cls_num_list: Sequence[int] | Tensor) -> list[int]:
        return [int(n) for n in check_class_counts(cls_num_list).tolist()]

    @property
    def active(self) -> bool:
        """Whether the class-balanced weights are applied in the current epoch."""
        return self._active

    def class_weights(self) -> Tensor:
        """The class-balanced weights applied from ``start_epoch`` on."""
        if self._counts is None:
            raise RuntimeError("class counts are not known yet: pass cls_num_list or run setup with a datamodule")
        return class_balanced_weights(self._counts, self.beta)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self._counts_given:  # read for every fit: a reused callback must not keep an old dataset's counts
            # Trainer.datamodule: set at runtime by Lightning, not in its annotations
            counts = getattr(trainer.datamodule, "train_class_counts", None)  # type: ignore[attr-defined]
            if counts is None:
                raise ValueError(
                    "DeferredReweighting needs class counts: pass cls_num_list=[n_0, n_1, ...] or use a datamodule "
                    "with a `train_class_counts` attribute"
                )
            self._counts = self._validated(counts)
        else:
            self._check_given_counts(trainer, pl_module)
        if starts_new_run(trainer):
            self._epoch_batches = 0
        if self.mode == "weighting":
            if not hasattr(pl_module, "attach_weighting"):
                raise TypeError(
                    f"{type(pl_module).__name__} does not use ReweightingMixin; mix it in, or use "
                    "DeferredReweighting(mode='criterion') with a criterion that has a class-weight buffer"
                )
        else:
            target = self._criterion_target(pl_module)
            waiting = isinstance(target, ClassCountLoss) and target.counts_from_data
            if waiting and len(target.cls_num_list or ()) != len(self._counts or ()):
                # built with cls_num_list=None and not filled for these classes yet (the module's setup, which gives
                # it the datamodule's counts, runs after this hook): these counts give it its class-weight buffer now
                target.set_class_counts(self._counts)  # type: ignore[arg-type]
                target.to(pl_module.device)
            self._weight_buffer(pl_module)

    def _check_given_counts(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``cls_num_list`` against the data: the wrong number of classes is an error, other counts a warning."""
        assert self._counts is not None
        # Trainer.datamodule: set at runtime by Lightning, not in its annotations
        data_counts = getattr(trainer.datamodule, "train_class_counts", None)  # type: ignore[attr-defined]
        classes = len(data_counts) if data_counts is not None else getattr(pl_module, "num_classes", None)
        if isinstance(classes, int) and classes != len(self._counts):
            source = "the datamodule's train_class_counts" if data_counts is not None else "the module's num_classes"
            raise ValueError(
                f"DeferredReweighting: cls_num_list has {len(self._counts)} classes but {source} says {classes}: "
                "give one count per class (or leave cls_num_list out to use the datamodule's counts)"
            )
        if data_counts is not None and [int(n) for n in data_counts] != self._counts:
            rank_zero_warn(
                f"DeferredReweighting: cls_num_list {self._counts} differs from the datamodule's train_class_counts "
                f"{[int(n) for n in data_counts]}; the class weights follow cls_num_list (leave it out to follow "
                "the data)"
            )

    @staticmethod
    def _criterion_target(pl_module: LightningModule) -> Any:
        """The loss whose ``weight`` mode="criterion" writes: the criterion, or its ``base_loss``."""
        criterion = getattr(pl_module, "criterion", None)
        target = getattr(criterion, "base_loss", None)
        return criterion if target is None else target

    def _weight_buffer(self, pl_module: LightningModule) -> Tensor:
        target = self._criterion_target(pl_module)
        weight = getattr(target, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 1:
            raise ValueError(
                "mode='criterion' needs `pl_module.criterion.weight` (or `.criterion.base_loss.weight`) to be a "
                "class-weight tensor, e.g. LDAMLoss(...) or nn.CrossEntropyLoss(weight=torch.ones(C)); "
                "or use mode='weighting'"
            )
        assert self._counts is not None
        if weight.numel() != len(self._counts):
            raise ValueError(f"criterion weight has {weight.numel()} classes but cls_num_list has {len(self._counts)}")
        return weight

    def _apply_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = trainer.current_epoch >= self.start_epoch
        self._epoch_batches = 0
        if self.mode == "weighting":
            if self._active:
                self._source = ClassWeighting(self.class_weights())
                cast(ReweightingMixin, pl_module).attach_weighting(self._name, self._source)
            else:
                self._source = None
                cast(ReweightingMixin, pl_module).detach_weighting(self._name)
        else:
            buffer = self._weight_buffer(pl_module)
            with torch.no_grad():
                buffer.copy_(self.class_weights() if self._active else torch.ones(buffer.numel()))
            setattr(self._criterion_target(pl_module), _WRITTEN, buffer.detach().float().cpu().clone())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        warn_if_never_reached(trainer, self.start_epoch, "DeferredReweighting")
        target = self._criterion_target(pl_module)
        counts = getattr(target, "cls_num_list", None)
        if isinstance(target, ClassCountLoss) and counts is not None and list(counts) != self._counts:
            rank_zero_warn(
                f"DeferredReweighting weights classes by the counts {self._counts}, but the criterion "
                f"{type(target).__name__} was built for {list(counts)}: pass the same counts to both (or neither, "
                "to use the datamodule's train_class_counts)"
            )
        if self.mode == "criterion":
            self._warn_if_replacing_own_weights(pl_module)
        # a run resumed mid-epoch gets no on_train_epoch_start for that epoch: apply its state here too
        self._apply_epoch(trainer, pl_module)

    def _warn_if_replacing_own_weights(self, pl_module: LightningModule) -> None:
        """The criterion came with class weights of its own (neither ones nor this callback's): they are replaced."""
        buffer = self._weight_buffer(pl_module).detach()
        weight = buffer.float().cpu()
        written = getattr(self._criterion_target(pl_module), _WRITTEN, None)  # by a DRW callback, in an earlier fit
        ours = [torch.ones_like(weight), self.class_weights(), *([] if written is None else [written])]
        # compared as the buffer holds them: a bf16 criterion (precision="bf16-true") rounds DRW's weights
        if any(w.shape == weight.shape and torch.allclose(weight, w.to(buffer.dtype).float()) for w in ours):
            return
        rank_zero_warn(
            f"DeferredReweighting(mode='criterion') replaces the criterion's own class weights "
            f"{[round(float(w), 4) for w in weight]} (ones before start_epoch={self.start_epoch}, class-balanced "
            "weights from it on); to combine them with DRW's, use mode='weighting' (its weights multiply the "
            "criterion's weighted per-sample losses)"
        )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_epoch(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._epoch_batches += 1

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._source is not None and self._epoch_batches > 0 and self._source.calls == 0:
            raise RuntimeError(
                f"DeferredReweighting(mode='weighting') was active for {self._epoch_batches} training batches but "
                f"{type(pl_module).__name__}.training_step never called self.reweight(losses, batch), so the class "
                "weights were not applied: return self.reweight(per_sample_losses, batch) from training_step, or "
                "use mode='criterion'"
            )

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # teardown does not run after an exception: leave the module as it was given
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.mode == "weighting" and hasattr(pl_module, "detach_weighting"):
            cast(ReweightingMixin, pl_module).detach_weighting(self._name)

    @property
    def _name(self) -> str:
        return type(self).__name__

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"start_epoch": self.start_epoch, "beta": self.beta, "mode": self.mode, "cls_num_list": self._counts}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The schedule is a function of the epoch; the constructor's arguments win over the saved ones.
        if self._counts is None and state_dict.get("cls_num_list") is not None:
            self._counts = list(state_dict["cls_num_list"])
