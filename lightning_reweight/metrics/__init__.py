"""torchmetrics Metrics for reweighting (DDP-correct through ``dist_reduce_fx``)."""

from lightning_reweight.metrics.longtail import BalancedAccuracy, PerClassAccuracy, ShotAccuracy
from lightning_reweight.metrics.weight_auroc import WeightNoiseAUROC, rank_auroc

__all__: list[str] = ["BalancedAccuracy", "PerClassAccuracy", "ShotAccuracy", "WeightNoiseAUROC", "rank_auroc"]
