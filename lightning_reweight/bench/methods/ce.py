"""Plain cross-entropy: the baseline every table row is compared with."""

from lightning_reweight.bench.methods import BuildContext, MethodParts, register_method


@register_method("ce", {"clean", "noise", "longtail"}, "cross-entropy, uniform weights")
def build_ce(ctx: BuildContext) -> MethodParts:
    """Cross-entropy with no reweighting."""
    return MethodParts()
