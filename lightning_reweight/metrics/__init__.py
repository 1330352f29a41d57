"""torchmetrics Metrics for reweighting (DDP-correct through ``dist_reduce_fx``)."""

from lightning_reweight.metrics.selection import ModelSelection, plot_model_selection, select_models

__all__: list[str] = ["ModelSelection", "plot_model_selection", "select_models"]
