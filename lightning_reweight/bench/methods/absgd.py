"""ABSGD (attentional DRO loss) rows: lam > 0 for long-tailed data (with and without DRW), lam < 0 for noise.

Hyperparameters, scaled from the paper's CIFAR recipes (200 epochs, lam 5 / 3 with CE-scale losses, gamma 0.7,
DRW from epoch 160; lam -3 for noise) to the digits recipe (60 epochs, an MLP whose training losses shrink far
faster than a ResNet's on CIFAR, so a smaller |lam| is needed for the weights to differ from uniform):

* ``absgd``: ERM for the first 20% of the epochs, then lam = ``LT_LAM``, gamma 0.9, alpha 1.
* ``absgd-drw``: the same, plus class-balanced weights ``(1 - beta) / (1 - beta^n_j)`` (beta 0.9999, normalised
  to sum to the number of classes) inside the base loss from 80% of the epochs (epoch 48 of 60, as 160 of 200).
* ``absgd-neg``: lam = ``NOISE_LAM`` from ``NOISE_START`` of the epochs, gamma 0.9, alpha 1.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_reweight.bench.methods import BuildContext, MethodParts, register_method
from lightning_reweight.callbacks.dro_schedule import DROSchedule
from lightning_reweight.losses.absgd import AttentionalDROLoss

LT_LAM = 1.0
LT_START = 0.0
NOISE_LAM = -1.0
NOISE_START = 0.1
GAMMA = 0.9
ALPHA = 1.0
DRW_START = 0.8
DRW_BETA = 0.9999
DRW_LAM = 2.0


def _effective_number_weights(counts: Any, beta: float) -> Tensor:
    # TODO(merge): replace with lightning_reweight.functional.class_balanced_weights (LDAM branch)
    n = torch.as_tensor(counts, dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - torch.pow(beta, n))
    return (w * n.numel() / w.sum()).float()


class _DeferredClassWeights(Callback):
    """Copy class weights into ``loss.weight`` from ``start_epoch`` on (ones before); epoch-determined."""

    # TODO(merge): replace with lightning_reweight.callbacks.DeferredReweighting (LDAM branch)
    def __init__(self, loss: nn.Module, weights: Tensor, start_epoch: int) -> None:
        self.loss, self.weights, self.start_epoch = loss, weights, start_epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        on = trainer.current_epoch >= self.start_epoch
        self.loss.weight.copy_(self.weights if on else torch.ones_like(self.weights))


def _stages(
    ctx: BuildContext, lam: float, start: float, base: nn.Module | None = None, later: dict[int, float] | None = None
) -> MethodParts:
    criterion = AttentionalDROLoss(lam=None, gamma=GAMMA, alpha=ALPHA, base_loss=base)
    schedule = DROSchedule(start_epoch=round(start * ctx.recipe.epochs), lam=lam, lam_schedule=later)
    return MethodParts(criterion=criterion, callbacks=[schedule])


@register_method("absgd", {"longtail"}, f"ABSGD, lam={LT_LAM} after {LT_START:.0%} ERM epochs")
def build_absgd(ctx: BuildContext) -> MethodParts:
    """ABSGD with a positive lam (up-weights hard, i.e. mostly tail-class, samples)."""
    return _stages(ctx, LT_LAM, LT_START)


@register_method("absgd-drw", {"longtail"}, f"ABSGD lam={LT_LAM} + class-balanced DRW from {DRW_START:.0%}")
def build_absgd_drw(ctx: BuildContext) -> MethodParts:
    """ABSGD with class-balanced (effective number) weights inside the loss from the DRW epoch."""
    counts = ctx.datamodule.train_class_counts
    base = nn.CrossEntropyLoss(weight=torch.ones(len(counts)), reduction="none")
    drw_epoch = round(DRW_START * ctx.recipe.epochs)
    parts = _stages(ctx, LT_LAM, LT_START, base, {drw_epoch: DRW_LAM} if DRW_LAM != LT_LAM else None)
    weights = _effective_number_weights(counts, DRW_BETA)
    parts.callbacks.append(_DeferredClassWeights(base, weights, drw_epoch))
    return parts


@register_method("absgd-neg", {"noise"}, f"ABSGD with negative lam={NOISE_LAM} (down-weights high losses)")
def build_absgd_neg(ctx: BuildContext) -> MethodParts:
    """ABSGD with a negative lam for label noise."""
    return _stages(ctx, NOISE_LAM, NOISE_START)
