"""The benchmark harness behind ``lightning-reweight benchmark``.

Named scenarios, a fixed recipe per scenario shared by every method, a method registry, and a runner that
measures accuracy and step time.
"""

from lightning_reweight.bench.methods import METHODS, BuildContext, MethodParts, MethodSpec, register_method
from lightning_reweight.bench.runner import run_benchmark, run_one
from lightning_reweight.bench.scenarios import PRESETS, SCENARIOS, Recipe, Scenario

__all__ = [
    "METHODS",
    "PRESETS",
    "SCENARIOS",
    "BuildContext",
    "MethodParts",
    "MethodSpec",
    "Recipe",
    "Scenario",
    "register_method",
    "run_benchmark",
    "run_one",
]
