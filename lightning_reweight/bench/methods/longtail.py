"""Long-tailed methods: cross-entropy with deferred re-weighting, LDAM, LDAM-DRW, logit adjustment.

Settings (the shared recipe is untouched; these are the methods' own):

- DRW starts at ``DRW_START_FRACTION`` of the epochs (the paper: 160 of 200), beta 0.9999, applied as PyTorch's
  class-weighted mean (``DeferredReweighting(mode="weighting")``).
- LDAM: ``max_m = 0.5``, ``s = 30`` (the paper's CIFAR values) on a normalised (cosine) head.
- Logit adjustment: ``tau = 1``; predictions use the raw logits.
"""

from __future__ import annotations

from lightning_reweight.bench.methods import BuildContext, MethodParts, register_method
from lightning_reweight.callbacks import DeferredReweighting
from lightning_reweight.losses import LDAMLoss, LogitAdjustedLoss

DRW_START_FRACTION = 0.8
DRW_BETA = 0.9999
LDAM_MAX_M = 0.5
LDAM_S = 30.0
LA_TAU = 1.0


def _counts(ctx: BuildContext) -> list[int]:
    return [int(n) for n in ctx.datamodule.train_class_counts]


def _drw(ctx: BuildContext) -> DeferredReweighting:
    start = max(1, int(round(DRW_START_FRACTION * ctx.recipe.epochs)))
    return DeferredReweighting(start_epoch=start, beta=DRW_BETA, mode="weighting", cls_num_list=_counts(ctx))


def _ldam(ctx: BuildContext) -> LDAMLoss:
    return LDAMLoss(_counts(ctx), max_m=LDAM_MAX_M, s=LDAM_S, reduction="none")


@register_method("ce-drw", {"longtail"}, "cross-entropy, class-balanced weights from 80% of the epochs")
def build_ce_drw(ctx: BuildContext) -> MethodParts:
    """Cross-entropy with deferred re-weighting."""
    return MethodParts(callbacks=[_drw(ctx)])


@register_method("ldam", {"longtail"}, "LDAM margins (max_m 0.5, s 30) on a cosine head")
def build_ldam(ctx: BuildContext) -> MethodParts:
    """LDAM loss, no re-weighting."""
    return MethodParts(criterion=_ldam(ctx), normalized_head=True)


@register_method("ldam-drw", {"longtail"}, "LDAM + class-balanced weights from 80% of the epochs")
def build_ldam_drw(ctx: BuildContext) -> MethodParts:
    """LDAM loss with deferred re-weighting."""
    return MethodParts(criterion=_ldam(ctx), callbacks=[_drw(ctx)], normalized_head=True)


@register_method("logit-adj", {"longtail"}, "logit-adjusted cross-entropy, tau 1")
def build_logit_adjusted(ctx: BuildContext) -> MethodParts:
    """Logit-adjusted cross-entropy."""
    return MethodParts(criterion=LogitAdjustedLoss(_counts(ctx), tau=LA_TAU, reduction="none"))
