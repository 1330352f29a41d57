"""torchmetrics Metrics for reweighting (DDP-correct through ``dist_reduce_fx``)."""

from lightning_reweight.metrics.longtail import BalancedAccuracy, PerClassAccuracy, ShotAccuracy

__all__: list[str] = ["BalancedAccuracy", "PerClassAccuracy", "ShotAccuracy"]
