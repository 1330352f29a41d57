"""Class-balanced and stratified index splits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_reweight.data._checks import as_labels, check_int, check_real, generator, infer_num_classes

__all__ = ["balanced_meta_split", "stratified_split"]


def balanced_meta_split(
    targets: Tensor | Sequence[int], per_class: int, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split off a class-balanced (meta) set with exactly ``per_class`` samples of every class.

    The classes are ``0..max(targets)``; the meta samples of each class are drawn uniformly without
    replacement with a local generator seeded with ``seed``.

    Args:
        targets: labels, a 1-D integer tensor or sequence of ints.
        per_class: number of meta samples per class (``>= 1``).
        seed: seed of the local random generator.

    Returns:
        ``(meta_indices, train_indices)``: disjoint sorted ``int64`` index tensors that together cover
        ``range(len(targets))``.

    Raises:
        ValueError: ``per_class < 1`` or a class holding fewer than ``per_class`` samples.

    Example:
        >>> meta, train = balanced_meta_split([0, 0, 0, 1, 1, 1, 1], per_class=2)
        >>> len(meta), len(train)
        (4, 3)
    """
    per_class = check_int("per_class", per_class, minimum=1)
    labels = as_labels(targets)
    n_classes = infer_num_classes(labels, None)
    gen = generator(seed)
    meta = []
    for cls in range(n_classes):
        members = torch.nonzero(labels == cls).flatten()
        if members.numel() < per_class:
            raise ValueError(
                f"per_class={per_class} is larger than class {cls} holds ({members.numel()} samples)"
            )
        meta.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    meta_indices = torch.cat(meta).sort().values
    in_meta = torch.zeros(labels.numel(), dtype=torch.bool)
    in_meta[meta_indices] = True
    return meta_indices, torch.nonzero(~in_meta).flatten()


def stratified_split(
    targets: Tensor | Sequence[int], fractions: Sequence[float], *, seed: int = 0
) -> list[Tensor]:
    """Split indices into parts that keep the class proportions.

    Within each class (of ``n_c`` samples, shuffled with a local generator seeded with ``seed``), part ``k``
    takes the samples between ``round(n_c * F_{k-1})`` and ``round(n_c * F_k)``, where ``F_k`` is the
    cumulative sum of ``fractions``. When ``fractions`` sum to less than 1, one more part holding the
    remaining indices is appended, so the parts always partition ``range(len(targets))``.

    Args:
        targets: labels, a 1-D integer tensor or sequence of ints.
        fractions: non-negative fractions summing to at most 1 (a sequence, or a 1-D tensor or numpy array).
        seed: seed of the local random generator.

    Returns:
        Sorted ``int64`` index tensors, one per fraction (plus the remainder when ``sum(fractions) < 1``).

    Raises:
        ValueError: an empty ``fractions``, a negative fraction, or fractions summing to more than 1.

    Example:
        >>> val, rest = stratified_split([0] * 10 + [1] * 20, [0.1])
        >>> len(val), len(rest)
        (3, 27)
    """
    if getattr(fractions, "ndim", None) == 1 and hasattr(fractions, "tolist"):  # a 1-D tensor or numpy array
        fractions = fractions.tolist()  # type: ignore[union-attr]
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or len(fractions) == 0:
        raise ValueError(f"fractions must be a non-empty sequence of floats, got {fractions!r}")
    fracs = [check_real(f"fractions[{k}]", f, low=0.0, high=1.0, high_inclusive=True) for k, f in
             enumerate(fractions)]
    total = math.fsum(fracs)
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions must sum to at most 1, got {total}")
    with_remainder = total < 1.0 - 1e-9
    cumulative = [math.fsum(fracs[: k + 1]) for k in range(len(fracs))]
    if not with_remainder:
        cumulative[-1] = 1.0
    labels = as_labels(targets)
    n_parts = len(fracs) + int(with_remainder)
    parts: list[list[Tensor]] = [[] for _ in range(n_parts)]
    if labels.numel() == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in range(n_parts)]
    gen = generator(seed)
    for cls in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        bounds = [0] + [min(round(members.numel() * c), members.numel()) for c in cumulative]
        if with_remainder:
            bounds.append(members.numel())
        for k in range(n_parts):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [torch.cat(p).sort().values for p in parts]
