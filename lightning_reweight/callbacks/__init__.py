"""Lightning callbacks: schedules, the meta-net updater, monitors (one file per callback)."""

__all__: list[str] = []
