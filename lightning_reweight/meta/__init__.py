"""The meta-gradient engine and its strategies."""

from lightning_reweight.meta.base import MetaStrategy
from lightning_reweight.meta.engine import FD_EPS, HYPERGRADS, MetaProblem, capture_rng
from lightning_reweight.meta.l2rw import L2RW
from lightning_reweight.meta.mwnet import MetaWeightNet, WeightNet

__all__: list[str] = [
    "FD_EPS",
    "HYPERGRADS",
    "L2RW",
    "MetaProblem",
    "MetaStrategy",
    "MetaWeightNet",
    "WeightNet",
    "capture_rng",
]
