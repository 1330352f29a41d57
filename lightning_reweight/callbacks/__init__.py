"""Lightning callbacks: schedules, the meta-net updater, monitors (one file per callback)."""

from lightning_reweight.callbacks.deferred_resampling import DeferredResampling
from lightning_reweight.callbacks.deferred_reweighting import ClassWeighting, DeferredReweighting
from lightning_reweight.callbacks.dro_schedule import DROSchedule
from lightning_reweight.callbacks.meta_reweight import MetaReweight
from lightning_reweight.callbacks.susceptibility import SusceptibilityMonitor

__all__: list[str] = [
    "ClassWeighting",
    "DROSchedule",
    "DeferredResampling",
    "DeferredReweighting",
    "MetaReweight",
    "SusceptibilityMonitor",
]
