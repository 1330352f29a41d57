"""A ready LightningModule: any backbone, a per-sample criterion, and the reweighting contract."""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import lightning as L
import torch
from lightning.pytorch.utilities import AttributeDict, rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_reweight.contract import (
    ReweightingMixin,
    SampleWeighting,
    check_per_sample_losses,
    split_batch,
)
from lightning_reweight.losses._counts import ClassCountLoss
from lightning_reweight.metrics.longtail import BalancedAccuracy

__all__ = ["ReweightClassifier", "build_optimizer"]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULERS = ("none", "cosine", "multistep", "warmup_multistep")


def build_optimizer(
    params: Any, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.Optimizer:
    """Build one of the supported optimizers by name.

    Args:
        params: parameters or parameter groups.
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: weight decay.
        nesterov: Nesterov momentum for SGD.

    Returns:
        The optimizer.

    Example:
        >>> from torch import nn
        >>> type(build_optimizer(nn.Linear(2, 2).parameters(), "adam", 1e-3)).__name__
        'Adam'
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {name!r}")


def _check_optimization(
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    milestones: Any,
    gamma: float,
    warmup_epochs: int,
) -> None:
    """The optimizer and scheduler arguments, checked when the module is built (not first at ``fit``)."""
    for name, value, ok, need in (
        ("lr", lr, lr > 0, "positive"),
        ("momentum", momentum, momentum >= 0, ">= 0"),
        ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ("gamma", gamma, gamma > 0, "positive (a negative factor would turn the lr negative)"),
    ):
        if not (ok and math.isfinite(value)):
            raise ValueError(f"{name} must be {need}, got {value}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs a momentum > 0")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, (list, tuple)):
        raise ValueError(f"milestones must be a list or tuple of epochs, got {milestones!r}")
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones):
        raise ValueError(f"milestones must be non-negative integer epochs, got {milestones!r}")


def _check_logits(logits: Tensor, num_classes: int) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(
            f"the backbone gives logits of shape {tuple(logits.shape)}, but ReweightClassifier(num_classes="
            f"{num_classes}) expects (B, {num_classes}): set num_classes to the backbone's number of outputs"
        )
    return logits


class ReweightClassifier(ReweightingMixin, L.LightningModule):
    """Classification with any backbone and any per-sample criterion, reduced through the contract.

    The training loss is ``reweight(criterion(backbone(x), y), batch)``: the plain mean unless a callback or
    the criterion attaches a weighting source. A criterion that is itself a
    :class:`~lightning_reweight.contract.SampleWeighting` and has a ``base_loss`` (e.g. ABSGD's attentional
    loss) is split: ``base_loss`` gives the per-sample losses and the criterion is attached as a weighting.

    Logs ``train/loss``, ``val/acc``, ``val/balanced_acc``, ``test/acc`` and ``test/balanced_acc``
    (balanced accuracy = mean per-class recall over the classes present in the evaluated targets,
    :class:`~lightning_reweight.metrics.BalancedAccuracy`). With several validation or test loaders (e.g. a clean
    and a noisy validation set) each has its own metrics, logged as ``val/acc/dataloader_idx_<k>`` (Lightning's
    suffix).

    The backbone and the criterion are modules, not hyperparameters: reload a checkpoint with
    ``ReweightClassifier.load_from_checkpoint(path, backbone=..., criterion=...)`` (the same kinds as trained; their
    weights and buffers come from the checkpoint). Without ``criterion=`` an ABSGD or LDAM checkpoint reloads with
    cross-entropy; the criterion's entries of the checkpoint are then dropped, with a warning naming them.

    Args:
        backbone: the network mapping inputs to logits.
        num_classes: number of classes.
        criterion: per-sample loss on ``(logits, targets)`` with ``reduction="none"`` (default cross-entropy).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: weight decay.
        nesterov: Nesterov momentum.
        scheduler: ``"none"``, ``"cosine"`` (over ``max_epochs``, stepped per epoch; per step over ``max_steps``
            when the run is step-based, ``max_epochs=-1``), ``"multistep"`` (``milestones``, ``gamma``) or
            ``"warmup_multistep"`` (linear warm-up over ``warmup_epochs``, then multistep; see
            :func:`lightning_reweight.schedules.warmup_multistep`).
        milestones: epochs at which ``"multistep"`` multiplies the lr by ``gamma``.
        gamma: the multistep factor.
        warmup_epochs: warm-up epochs of ``"warmup_multistep"``.

    Example:
        >>> import torch
        >>> from lightning_reweight.models import MLP
        >>> model = ReweightClassifier(MLP(64, 10, hidden=(32,)), num_classes=10)
        >>> batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.arange(4))
        >>> model.training_step(batch, 0).shape
        torch.Size([])
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        criterion: nn.Module | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        scheduler: Literal["none", "cosine", "multistep", "warmup_multistep"] = "none",
        milestones: tuple[int, ...] = (),
        gamma: float = 0.1,
        warmup_epochs: int = 5,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in _SCHEDULERS:
            raise ValueError(f"scheduler must be one of {_SCHEDULERS}, got {scheduler!r}")
        _check_optimization(lr, momentum, weight_decay, nesterov, milestones, gamma, warmup_epochs)
        if scheduler in ("multistep", "warmup_multistep") and not milestones:
            rank_zero_warn(
                f'ReweightClassifier(scheduler="{scheduler}") without milestones: the lr never decays'
                + (" after the warm-up" if scheduler == "warmup_multistep" else "")
                + " (pass milestones=(e1, e2, ...))"
            )
        self.save_hyperparameters(ignore=["backbone", "criterion"])
        self.backbone = backbone
        self.num_classes = num_classes
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss(reduction="none")
        base = getattr(self.criterion, "base_loss", None)
        if isinstance(self.criterion, SampleWeighting) and isinstance(base, nn.Module):
            self._per_sample_criterion: nn.Module = base
            self.attach_weighting("criterion", self.criterion)
        else:
            self._per_sample_criterion = self.criterion
        reduction = getattr(self._per_sample_criterion, "reduction", "none")
        if reduction != "none":
            raise ValueError(
                f"criterion has reduction={reduction!r}; reweighting needs per-sample losses: "
                "construct it with reduction='none'"
            )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_bacc = BalancedAccuracy(num_classes)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_bacc = BalancedAccuracy(num_classes)
        self._more_eval_metrics = nn.ModuleDict()  # the metrics of evaluation loaders after the first

    def setup(self, stage: str) -> None:
        """Give a count-based criterion (LDAM, logit adjustment) the datamodule's class counts, or check them.

        A criterion built with ``cls_num_list=None`` (a config file cannot name the data's counts) gets
        ``trainer.datamodule.train_class_counts``: at every ``fit`` (the training data defines them), and at the
        other stages when it has neither counts nor values loaded from a checkpoint. Counts given explicitly are
        kept, with a warning when they differ from the datamodule's (counts typed by hand drift from the data).

        Raises:
            ValueError: when the datamodule has more classes than ``num_classes``, or a criterion's counts name
                another number of classes (a datamodule with fewer classes only warns).
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            message = (
                f"ReweightClassifier(num_classes={self.num_classes}) but the datamodule has {data_classes} classes: "
                f"build the module with num_classes={data_classes} (and a backbone with as many outputs)"
            )
            if data_classes > self.num_classes:  # labels beyond the logits: every step would fail or mislead
                raise ValueError(message)
            rank_zero_warn(message)
        data_counts = getattr(datamodule, "train_class_counts", None)
        for loss in (self.criterion, getattr(self.criterion, "base_loss", None)):
            if isinstance(loss, ClassCountLoss) and loss.counts_from_data:
                if data_counts is not None and (stage == "fit" or not loss.has_class_counts):
                    loss.set_class_counts(data_counts)
                    loss.to(self.device)
                continue
            counts = getattr(loss, "cls_num_list", None)
            if counts is not None and len(counts) != self.num_classes:
                raise ValueError(
                    f"{type(loss).__name__} was built for {len(counts)} classes (cls_num_list={list(counts)}), but "
                    f"ReweightClassifier has num_classes={self.num_classes}: pass one count per class, or "
                    "cls_num_list=None to have the datamodule's counts filled in"
                )
            if stage == "fit" and counts is not None and data_counts is not None:
                if [int(n) for n in counts] != [int(n) for n in data_counts]:
                    rank_zero_warn(
                        f"{type(loss).__name__} was built for class counts {list(counts)}, but the datamodule's "
                        f"train_class_counts are {[int(n) for n in data_counts]}: its margins/offsets do not match "
                        "the training data (pass the datamodule's counts after dm.setup('fit'), or "
                        "cls_num_list=None to have them filled in from the datamodule)"
                    )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Match the checkpoint's criterion state to this module's criterion (the backbone is loaded strictly).

        The criterion is not a hyperparameter: a checkpoint trained with ABSGD or LDAM holds its buffers
        (``criterion.log_u``, ``criterion.margins``, ...), which a module built for inference with the default
        criterion does not have, and the reverse. Criterion entries this module lacks are dropped, and the ones
        the checkpoint lacks keep this module's values, with a warning naming them.
        """
        state = checkpoint.get("state_dict")
        if not isinstance(state, dict):
            return
        for name, module in self.named_modules():
            if isinstance(module, ClassCountLoss):  # a criterion still waiting for its counts takes the saved ones
                module.materialize_from(state, f"{name}.")
        prefixes = ("criterion.", "_per_sample_criterion.")  # the criterion, or its base loss when it is split
        own = {k for k in self.state_dict() if k.startswith(prefixes)}
        saved = {k for k in state if k.startswith(prefixes)}
        dropped, kept = sorted(saved - own), sorted(own - saved)
        if not dropped and not kept:
            return
        for key in dropped:
            del state[key]
        current = self.state_dict()
        for key in kept:
            state[key] = current[key]
        rank_zero_warn(
            f"ReweightClassifier: the checkpoint's criterion differs from this module's "
            f"({type(self.criterion).__name__}); ignored checkpoint entries {dropped}, kept this module's {kept}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the backbone."""
        return self.backbone(x)

    def per_sample_loss(self, batch: Any) -> Tensor:
        """Per-sample criterion values of ``batch``, shape ``(B,)``."""
        x, y, _ = split_batch(batch)
        logits = _check_logits(self(x), self.num_classes)
        return check_per_sample_losses(self._per_sample_criterion(logits, y), y.shape[0])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Per-sample losses reduced through :meth:`reweight`."""
        losses = self.per_sample_loss(batch)
        loss = self.reweight(losses, batch)
        if self._trainer is not None:
            self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=losses.shape[0], sync_dist=True)
        return loss

    def _eval_metrics(self, stage: str, dataloader_idx: int) -> tuple[tuple[Any, str], tuple[Any, str]]:
        """The metrics of one evaluation loader with their attribute names (Lightning's ``metric_attribute``).

        The module's attributes for loader 0; a pair created on first use for each further loader.
        """
        if dataloader_idx == 0:
            return (getattr(self, f"{stage}_acc"), f"{stage}_acc"), (getattr(self, f"{stage}_bacc"), f"{stage}_bacc")
        key = f"{stage}_{dataloader_idx}"
        if key not in self._more_eval_metrics:  # a second loader (e.g. clean and noisy validation sets)
            pair = nn.ModuleList(
                [MulticlassAccuracy(self.num_classes, average="micro"), BalancedAccuracy(self.num_classes)]
            )
            self._more_eval_metrics[key] = pair.to(self.device)
        acc, bacc = cast(nn.ModuleList, self._more_eval_metrics[key])
        return (acc, f"_more_eval_metrics.{key}.0"), (bacc, f"_more_eval_metrics.{key}.1")

    def _eval_step(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        (acc, acc_name), (bacc, bacc_name) = self._eval_metrics(stage, dataloader_idx)
        x, y, _ = split_batch(batch)
        preds = _check_logits(self(x), self.num_classes).argmax(dim=1)
        acc.update(preds, y)
        bacc.update(preds, y)
        # with several loaders Lightning appends "/dataloader_idx_<k>" to the keys
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, metric_attribute=acc_name)
        self.log(f"{stage}/balanced_acc", bacc, on_step=False, on_epoch=True, metric_attribute=bacc_name)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accuracy and balanced accuracy (per loader when there are several)."""
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Accuracy and balanced accuracy (per loader when there are several)."""
        self._eval_step(batch, "test", dataloader_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Logits of a batch ``(inputs, ...)`` or of bare inputs (``trainer.predict``, CLI ``predict``)."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    def configure_optimizers(self) -> Any:
        """The optimizer (and scheduler) chosen in ``__init__``."""
        hp = cast(AttributeDict, self.hparams)  # save_hyperparameters() made it one
        opt = build_optimizer(
            self.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, hp.nesterov
        )
        if hp.scheduler == "none":
            return opt
        if hp.scheduler == "cosine":
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 0:  # step-based training (max_steps): one decay over the run's steps
                total = self.trainer.estimated_stepping_batches
                if not math.isfinite(total):
                    raise ValueError(
                        'scheduler="cosine" anneals over the run, which has no end here (max_epochs=-1 without '
                        "max_steps): set max_epochs or max_steps"
                    )
                steps = max(int(total), 1)
                sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(epochs), 1))
        elif hp.scheduler == "warmup_multistep":
            from lightning_reweight.schedules import warmup_multistep

            sched = warmup_multistep(opt, hp.get("warmup_epochs", 5), hp.milestones, hp.gamma)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
