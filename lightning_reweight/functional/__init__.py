"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

from lightning_reweight.functional.l2rw import l2rw_weights
from lightning_reweight.functional.longtail import (
    check_class_counts,
    class_balanced_sample_weights,
    class_balanced_weights,
    ldam_margins,
    logit_adjustment_offsets,
)

__all__: list[str] = [
    "check_class_counts",
    "class_balanced_sample_weights",
    "class_balanced_weights",
    "l2rw_weights",
    "ldam_margins",
    "logit_adjustment_offsets",
]
