"""Long-tailed subsampling of a balanced dataset (exponential and step profiles)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_reweight.data._checks import (
    as_labels,
    check_choice,
    check_int,
    check_real,
    generator,
    infer_num_classes,
)

__all__ = ["IMBALANCE_PROFILES", "class_counts", "long_tailed_counts", "long_tailed_indices"]

#: The imbalance profiles accepted by :func:`long_tailed_counts` and :func:`long_tailed_indices`.
IMBALANCE_PROFILES: tuple[str, ...] = ("exp", "step")


def class_counts(targets: Tensor | Sequence[int], num_classes: int | None = None) -> list[int]:
    """Count the samples of each class.

    Args:
        targets: labels, a 1-D integer tensor or sequence of ints.
        num_classes: number of classes; defaults to ``max(targets) + 1``.

    Returns:
        ``counts[c]`` = number of samples with label ``c``, for ``c`` in ``0..num_classes-1``.

    Example:
        >>> class_counts([0, 2, 2, 1, 2])
        [1, 1, 3]
        >>> class_counts([1, 1], num_classes=3)
        [0, 2, 0]
    """
    labels = as_labels(targets, num_classes)
    n_classes = infer_num_classes(labels, num_classes)
    return torch.bincount(labels, minlength=n_classes).tolist()


def _floor(x: float) -> int:
    """``floor(x)``, but a count the rounding left a hair below a whole number (``49 * (1 / 49)``) is that number."""
    return int(x + 1e-9)


def long_tailed_counts(
    n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp", *, stacklevel: int = 2
) -> list[int]:
    """Per-class sample counts of a long-tailed dataset (class 0 is the head).

    With ``rho = imbalance_ratio`` and ``C = num_classes``:

    * ``"exp"``: ``n_i = int(n_max * (1 / rho) ** (i / (C - 1)))`` (the LDAM-DRW / CIFAR-LT protocol);
    * ``"step"``: ``n_i = n_max`` for ``i < C // 2`` and ``int(n_max / rho)`` for the other classes.

    ``int`` is the exact floor: a value that floating point leaves a hair below a whole number (``49 / 49``) counts
    as that number (a literal ``int(...)`` gives one less there, e.g. the tail of ``n_max = 49, rho = 49``).

    Args:
        n_max: size of the head class (``>= 1``).
        num_classes: number of classes ``C`` (``>= 1``).
        imbalance_ratio: ``rho = n_max / n_min`` (``>= 1``; 1 is balanced).
        profile: ``"exp"`` or ``"step"``.
        stacklevel: where the empty-class warning points (2: the caller of this function).

    Returns:
        The ``C`` per-class counts. A ``UserWarning`` names the classes left empty when ``n_max / rho < 1``.

    Example:
        >>> long_tailed_counts(5000, 10, 100)
        [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
        >>> long_tailed_counts(100, 4, 10, profile="step")
        [100, 100, 10, 10]
    """
    n_max = check_int("n_max", n_max, minimum=1)
    num_classes = check_int("num_classes", num_classes, minimum=1)
    rho = check_real("imbalance_ratio", imbalance_ratio, low=1.0)
    check_choice("profile", profile, IMBALANCE_PROFILES)
    if num_classes == 1:
        return [n_max]
    if profile == "exp":
        counts = [_floor(n_max * (1.0 / rho) ** (i / (num_classes - 1))) for i in range(num_classes)]
    else:
        counts = [n_max if i < num_classes // 2 else _floor(n_max / rho) for i in range(num_classes)]
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        warnings.warn(
            f"imbalance_ratio={rho} with n_max={n_max} leaves {len(empty)} of {num_classes} classes with no "
            f"samples (classes {empty[:10]}{'...' if len(empty) > 10 else ''}); the tail needs "
            f"n_max >= imbalance_ratio to keep one sample per class",
            UserWarning,
            stacklevel=stacklevel,
        )
    return counts


def long_tailed_indices(
    targets: Tensor | Sequence[int],
    imbalance_ratio: float,
    *,
    profile: str = "exp",
    seed: int = 0,
    n_max: int | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Indices of a long-tailed subsample of a (roughly) balanced labelled dataset.

    Class ``i`` keeps ``long_tailed_counts(n_max, C, imbalance_ratio, profile)[i]`` samples, drawn uniformly
    without replacement (local generator seeded with ``seed``). ``C = num_classes``, by default
    ``max(targets) + 1`` (pass it when the last classes may hold no sample: their quota is then an error, not a
    profile over fewer classes).

    Args:
        targets: labels, a 1-D integer tensor or sequence of ints.
        imbalance_ratio: ``rho = n_max / n_min`` (``>= 1``).
        profile: ``"exp"`` or ``"step"`` (see :func:`long_tailed_counts`).
        seed: seed of the local random generator.
        n_max: size of the head class; defaults to the smallest non-zero class count, so that every class
            can supply its quota (5000 for the full CIFAR-10 train set, 500 for CIFAR-100's; less for what is
            left of them after a validation or meta split).
        num_classes: the number of classes ``C``; default ``max(targets) + 1``.

    Returns:
        The kept indices into ``targets``, sorted ascending (``int64``).

    Raises:
        ValueError: ``imbalance_ratio < 1``, an unknown ``profile``, or a class holding fewer samples than its
            quota.

    Example:
        >>> y = torch.arange(3).repeat_interleave(10)  # 10 samples of each of 3 classes
        >>> kept = long_tailed_indices(y, 10.0)
        >>> class_counts(y[kept])
        [10, 3, 1]
    """
    rho = check_real("imbalance_ratio", imbalance_ratio, low=1.0)
    check_choice("profile", profile, IMBALANCE_PROFILES)
    labels = as_labels(targets, num_classes)
    n_classes = infer_num_classes(labels, num_classes)
    counts = torch.bincount(labels, minlength=n_classes)
    given = n_max is not None
    if n_max is None:
        n_max = int(counts[counts > 0].min())
    quotas = long_tailed_counts(n_max, n_classes, rho, profile, stacklevel=3)  # the warning names our caller
    gen = generator(seed)
    kept = []
    for cls, quota in enumerate(quotas):
        members = torch.nonzero(labels == cls).flatten()
        if quota > members.numel():
            # with the default n_max (the smallest non-empty class) only an empty class falls short
            hint = "lower n_max" if given else "every class needs samples (n_max defaults to the smallest non-empty)"
            raise ValueError(
                f"class {cls} holds {members.numel()} samples but its long-tail quota is {quota} "
                f"(n_max={n_max}, imbalance_ratio={rho}, profile={profile!r}): {hint}"
            )
        kept.append(members[torch.randperm(members.numel(), generator=gen)[:quota]])
    return torch.cat(kept).sort().values
