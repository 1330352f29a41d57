"""torchmetrics Metrics for reweighting (DDP-correct through ``dist_reduce_fx``)."""

__all__: list[str] = []
