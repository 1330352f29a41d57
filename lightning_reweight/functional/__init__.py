"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

from lightning_reweight.functional.l2rw import l2rw_weights

__all__: list[str] = ["l2rw_weights"]
