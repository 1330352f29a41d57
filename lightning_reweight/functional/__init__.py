"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

from lightning_reweight.functional.dro import dro_objective, dro_weights, log_mean_exp

__all__: list[str] = ["dro_objective", "dro_weights", "log_mean_exp"]
