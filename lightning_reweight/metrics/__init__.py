"""torchmetrics Metrics for reweighting (DDP-correct through ``dist_reduce_fx``)."""

from lightning_reweight.metrics.longtail import BalancedAccuracy, PerClassAccuracy, ShotAccuracy
from lightning_reweight.metrics.selection import (
    ModelSelection,
    plot_model_selection,
    select_models,
    susceptibility_from_checkpoint,
)
from lightning_reweight.metrics.weight_auroc import WeightNoiseAUROC, rank_auroc
from lightning_reweight.metrics.weight_history import SampleWeightHistory

__all__: list[str] = [
    "BalancedAccuracy",
    "ModelSelection",
    "PerClassAccuracy",
    "SampleWeightHistory",
    "ShotAccuracy",
    "WeightNoiseAUROC",
    "plot_model_selection",
    "rank_auroc",
    "select_models",
    "susceptibility_from_checkpoint",
]
