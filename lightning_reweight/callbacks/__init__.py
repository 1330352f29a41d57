"""Lightning callbacks: schedules, the meta-net updater, monitors (one file per callback)."""

from lightning_reweight.callbacks.dro_schedule import DROSchedule

__all__: list[str] = ["DROSchedule"]
