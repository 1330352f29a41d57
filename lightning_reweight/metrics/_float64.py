"""A torchmetrics base whose states stay float64 through every dtype move (``.to(dtype)``, true-precision runs)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torchmetrics import Metric


class Float64Metric(Metric):
    """A :class:`~torchmetrics.Metric` whose floating states are float64 and stay so.

    A dtype move (``.to(torch.float32)``, ``set_dtype``, Lightning's ``bf16-true`` / ``16-true`` conversion of
    the module that holds the metric) moves the states between devices only: rounding them would tie distinct
    weights and miscount visits.
    """

    @property
    def dtype(self) -> torch.dtype:
        """float64: the states' dtype, and that of the empty state a rank without samples sends in a DDP sync."""
        return torch.float64

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> Any:
        # the module and bookkeeping only (torchmetrics returns the metric itself, typed as a Module)
        this = cast(Metric, super()._apply(fn, exclude_state=tuple(self._defaults)))
        device = fn(torch.zeros(1, device=self.device)).device

        def move(value: Any) -> Any:
            return value.to(device) if isinstance(value, Tensor) else [v.to(device) for v in value]

        for key, default in this._defaults.items():
            if key not in exclude_state:
                this._defaults[key] = move(default)
                setattr(this, key, move(getattr(this, key)))
        this._computed = None  # torchmetrics converted the cached results: compute() recomputes from the states
        this._forward_cache = None
        return this
