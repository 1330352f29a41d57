"""The method registry of the benchmark: each method says how to build its criterion and callbacks.

A method module calls :func:`register_method` at import time; the imports at the bottom of this file list
the built-in methods.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback
from torch import nn

__all__ = ["BUILTIN_MODULES", "METHODS", "BuildContext", "MethodParts", "MethodSpec", "register_method"]


@dataclass
class BuildContext:
    """What a method builder sees: the scenario, its recipe, the set-up datamodule and the seed."""

    scenario: Any
    recipe: Any
    datamodule: Any
    seed: int


@dataclass
class MethodParts:
    """What a method contributes to the shared recipe.

    Attributes:
        criterion: per-sample criterion (``None``: cross-entropy).
        callbacks: callbacks added to the Trainer.
        normalized_head: replace the backbone's last linear layer with a cosine head (LDAM).
    """

    criterion: nn.Module | None = None
    callbacks: list[Callback] = field(default_factory=list)
    normalized_head: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, the scenario tags it applies to, and its builder."""

    name: str
    build: Callable[[BuildContext], MethodParts]
    tags: frozenset[str]
    description: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, tags: set[str] | frozenset[str], description: str = ""
) -> Callable[[Callable[[BuildContext], MethodParts]], Callable[[BuildContext], MethodParts]]:
    """Decorator registering a builder under ``name`` for scenarios with any of ``tags``.

    Example:
        >>> @register_method("plain-doc-example", {"clean"}, "doc example")
        ... def _build(ctx):
        ...     return MethodParts()
        >>> METHODS["plain-doc-example"].tags
        frozenset({'clean'})
    """

    def decorator(fn: Callable[[BuildContext], MethodParts]) -> Callable[[BuildContext], MethodParts]:
        if name in METHODS and METHODS[name].build is not fn:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, fn, frozenset(tags), description)
        return fn

    return decorator


#: Built-in method modules, imported in this order (= table order); each registers its rows when imported.
BUILTIN_MODULES: tuple[str, ...] = ("ce", "longtail", "absgd", "meta")

for _module in BUILTIN_MODULES:
    importlib.import_module(f"{__name__}.{_module}")
