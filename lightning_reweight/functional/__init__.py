"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

from lightning_reweight.functional.dro import dro_objective, dro_weights, log_mean_exp
from lightning_reweight.functional.l2rw import l2rw_weights
from lightning_reweight.functional.longtail import (
    check_class_counts,
    class_balanced_sample_weights,
    class_balanced_weights,
    ldam_margins,
    logit_adjustment_offsets,
)
from lightning_reweight.functional.susceptibility import susceptibility_losses, susceptibility_step

__all__: list[str] = [
    "check_class_counts",
    "class_balanced_sample_weights",
    "class_balanced_weights",
    "dro_objective",
    "dro_weights",
    "l2rw_weights",
    "ldam_margins",
    "log_mean_exp",
    "logit_adjustment_offsets",
    "susceptibility_losses",
    "susceptibility_step",
]
