"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

from lightning_reweight.functional.susceptibility import susceptibility_step

__all__: list[str] = ["susceptibility_step"]
