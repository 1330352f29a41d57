"""Lightning callbacks: schedules, the meta-net updater, monitors (one file per callback)."""

from lightning_reweight.callbacks.meta_reweight import MetaReweight

__all__: list[str] = ["MetaReweight"]
