"""Lightning callbacks: schedules, the meta-net updater, monitors (one file per callback)."""

from lightning_reweight.callbacks.susceptibility import SusceptibilityMonitor

__all__: list[str] = ["SusceptibilityMonitor"]
