"""Named benchmark scenarios on the embedded digits data, and the recipe every method shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

__all__ = ["PRESETS", "SCENARIOS", "Recipe", "Scenario"]


@dataclass(frozen=True)
class Recipe:
    """The training recipe of a scenario: identical for every method (only the method changes)."""

    epochs: int = 60
    batch_size: int = 100
    meta_batch_size: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    hidden: tuple[int, ...] = (256, 256)
    meta_per_class: int = 10


@dataclass(frozen=True)
class Scenario:
    """A data setting: label noise and/or class imbalance on the digits data.

    ``tags`` say which methods apply: "clean", "noise" or "longtail".
    """

    name: str
    noise_rate: float = 0.0
    noise_kind: str = "symmetric"
    imbalance_ratio: float = 1.0
    imbalance_profile: str = "exp"
    tags: frozenset[str] = field(default_factory=frozenset)
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""


def _s(name: str, tags: set[str], description: str, **kw: object) -> Scenario:
    return Scenario(name=name, tags=frozenset(tags), description=description, **kw)  # type: ignore[arg-type]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _s("digits-clean", {"clean"}, "clean labels, balanced classes"),
        _s("digits-sym40", {"noise"}, "40% symmetric noise (flip to a different class)", noise_rate=0.4),
        _s("digits-sym60", {"noise"}, "60% symmetric noise (flip to a different class)", noise_rate=0.6),
        _s("digits-pair40", {"noise"}, "40% pair flip (j -> j+1)", noise_rate=0.4, noise_kind="pairflip"),
        _s("digits-lt10", {"longtail"}, "long-tailed, exponential profile, imbalance 10", imbalance_ratio=10.0),
        _s("digits-lt50", {"longtail"}, "long-tailed, exponential profile, imbalance 50", imbalance_ratio=50.0),
    )
}

#: Named selections for the command line: scenarios, seeds, epochs (None: the recipe's) and methods (None: all
#: registered; "quick" leaves out the exact-hypergradient meta variants, which are slower and match "-fd").
class _PresetKeys(TypedDict):
    scenarios: list[str]
    seeds: list[int]
    epochs: int | None


class _Preset(_PresetKeys, total=False):
    """A :data:`PRESETS` entry; ``exclude_methods`` is optional."""

    exclude_methods: list[str]


PRESETS: dict[str, _Preset] = {
    "quick": {
        "scenarios": ["digits-sym40", "digits-lt50"],
        "seeds": [0],
        "epochs": None,
        "exclude_methods": ["l2rw-fwd", "l2rw-2nd", "mwn-fwd", "mwn-2nd", "mwn-fo-fd", "mwn-dl-fd", "mwn-dl-fwd"],
    },
    "standard": {"scenarios": list(SCENARIOS), "seeds": [0, 1, 2], "epochs": None},
    "full": {"scenarios": list(SCENARIOS), "seeds": [0, 1, 2, 3, 4], "epochs": None},
}
