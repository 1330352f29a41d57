"""Shared argument checks for :mod:`lightning_reweight.data` (private).

Every check names the offending argument in its error message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import Tensor


def _unwrap_scalar(value: object) -> object:
    """A 0-d tensor or numpy array as its Python scalar (other values unchanged)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()  # type: ignore[attr-defined]
    return value


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int``, raising when it is not an integer ``>= minimum``.

    Example:
        >>> check_int("batch_size", 4, minimum=1)
        4
    """
    value = _unwrap_scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    high_inclusive: bool = False,
) -> float:
    """Return ``value`` as a finite ``float`` in ``[low, high)`` (or ``[low, high]``).

    Python and numpy numbers and 0-d tensors or arrays are accepted (booleans are not).

    Example:
        >>> check_real("noise_rate", 0.2, low=0.0, high=1.0)
        0.2
        >>> check_real("noise_rate", torch.tensor(0.25), low=0.0, high=1.0)
        0.25
    """
    value = _unwrap_scalar(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    upper_ok = high is None or (value <= high if high_inclusive else value < high)
    if (low is not None and value < low) or not upper_ok:
        bracket = "]" if high_inclusive else ")"
        interval = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{bracket}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` when it is one of ``choices``.

    Example:
        >>> check_choice("profile", "exp", ("exp", "step"))
        'exp'
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def as_labels(
    targets: Tensor | Sequence[int], num_classes: int | None = None, name: str = "targets"
) -> Tensor:
    """Convert ``targets`` to a 1-D ``int64`` tensor of labels in ``[0, num_classes)``.

    Example:
        >>> as_labels([0, 2, 1]).tolist()
        [0, 2, 1]
    """
    if isinstance(targets, Tensor):
        y = targets.detach().cpu()
    else:
        try:
            y = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 1-D tensor or sequence of ints: {err}") from err
    if y.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        if y.numel() and not (y.is_floating_point() and bool((y == y.round()).all())):
            raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.long()
    if num_classes is not None:
        check_int("num_classes", num_classes, minimum=1)
    if y.numel():
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise ValueError(f"{name} must be non-negative class labels, found {low}")
        if num_classes is not None and high >= num_classes:
            raise ValueError(f"{name} holds label {high}, outside [0, num_classes={num_classes})")
    return y


def infer_num_classes(labels: Tensor, num_classes: int | None) -> int:
    """``num_classes`` when given, else ``max(labels) + 1`` (``labels`` already checked).

    Example:
        >>> infer_num_classes(torch.tensor([0, 3]), None)
        4
    """
    if num_classes is not None:
        return check_int("num_classes", num_classes, minimum=1)
    if labels.numel() == 0:
        raise ValueError("targets is empty: cannot infer num_classes; pass num_classes")
    return int(labels.max()) + 1


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (never the global RNG).

    Example:
        >>> generator(0).initial_seed()
        0
    """
    check_int("seed", seed)
    return torch.Generator().manual_seed(int(seed))
