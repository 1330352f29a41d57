"""Synthetic label noise: symmetric, pair-flip and transition-matrix corruption."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.data._checks import as_labels, check_real, generator, infer_num_classes

__all__ = ["CIFAR10_ASYMMETRIC_MAP", "NOISE_KINDS", "inject_label_noise"]

#: The named noise kinds accepted by :func:`inject_label_noise` (a transition matrix is also accepted).
NOISE_KINDS: tuple[str, ...] = ("symmetric", "symmetric_all", "pairflip", "cifar10_asymmetric")

#: The CIFAR-10 asymmetric convention (class-dependent, between similar classes): truck -> automobile,
#: bird -> airplane, cat <-> dog, deer -> horse; the other five classes keep their labels.
CIFAR10_ASYMMETRIC_MAP: dict[int, int] = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}


def inject_label_noise(
    targets: Tensor | Sequence[int],
    noise_rate: float,
    *,
    kind: str | Tensor | Sequence[Sequence[float]] | Any = "symmetric",
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Corrupt class labels with synthetic noise.

    Named kinds corrupt exactly ``round(noise_rate * N)`` samples, chosen uniformly without replacement:

    * ``"symmetric"``: each chosen label is replaced by a class drawn uniformly from the ``C - 1`` *other*
      classes, so the realised noise rate equals ``noise_rate`` (up to rounding).
    * ``"symmetric_all"``: each chosen label is redrawn uniformly from all ``C`` classes; about ``1/C`` of
      them keep their label, so the realised rate is about ``noise_rate * (C - 1) / C``.
    * ``"pairflip"``: each chosen label ``j`` becomes ``(j + 1) mod C``.
    * ``"cifar10_asymmetric"`` (``C = 10``): the CIFAR-10 convention :data:`CIFAR10_ASYMMETRIC_MAP`; exactly
      ``round(noise_rate * n_j)`` samples of each of the five source classes ``j`` are flipped to its target and
      the other classes are untouched, so the overall realised rate is about ``noise_rate / 2`` on balanced data.

    ``kind`` may also be a ``C x C`` row-stochastic transition matrix ``T`` (tensor, numpy array or nested
    sequence): every sample's noisy label is drawn from row ``T[y]``, so ``T[i, j]`` is the probability that
    class ``i`` is observed as class ``j``. ``noise_rate`` is **ignored** (not even validated) in that case:
    the matrix alone sets the noise. Randomness comes from a local generator seeded with ``seed``; the global
    RNG is neither used nor advanced.

    Args:
        targets: clean labels, a 1-D integer tensor or sequence of ints.
        noise_rate: fraction of samples to corrupt, in ``[0, 1]`` (named kinds only; a number or a 0-d
            tensor/array).
        kind: ``"symmetric"``, ``"symmetric_all"``, ``"pairflip"``, ``"cifar10_asymmetric"`` or a ``C x C``
            transition matrix.
        num_classes: number of classes ``C``; defaults to ``max(targets) + 1`` (or the matrix size).
        seed: seed of the local random generator.

    Returns:
        ``(noisy_targets, is_noisy)``: the noisy labels (``int64``) and a boolean mask that is ``True``
        exactly where the noisy label differs from the clean one.

    Raises:
        ValueError: ``noise_rate`` outside ``[0, 1]``, labels outside ``[0, C)`` (``targets``), an unknown
            ``kind``, or a transition matrix of the wrong shape or whose rows are not distributions.

    Example:
        >>> noisy, is_noisy = inject_label_noise([0, 1, 2, 3] * 25, 0.2, kind="pairflip", seed=0)
        >>> int(is_noisy.sum())
        20
        >>> bool(((torch.tensor([0, 1, 2, 3] * 25)[is_noisy] + 1) % 4 == noisy[is_noisy]).all())
        True
    """
    if isinstance(kind, str):
        if kind not in NOISE_KINDS:
            raise ValueError(
                f"kind must be one of {', '.join(repr(k) for k in NOISE_KINDS)} or a C x C transition "
                f"matrix; got {kind!r}"
            )
        rate = check_real("noise_rate", noise_rate, low=0.0, high=1.0, high_inclusive=True)
        labels = as_labels(targets, num_classes)
        n_classes = infer_num_classes(labels, num_classes)
        return _corrupt_named(labels, rate, kind, n_classes, seed)

    matrix = _as_transition_matrix(kind)
    labels = as_labels(targets, num_classes if num_classes is not None else matrix.shape[0])
    n_classes = infer_num_classes(labels, num_classes if num_classes is not None else matrix.shape[0])
    if matrix.shape[0] != n_classes:
        size = matrix.shape[0]
        raise ValueError(f"kind (transition matrix) is {size} x {size} but num_classes is {n_classes}")
    gen = generator(seed)
    if labels.numel() == 0:
        return labels.clone(), torch.zeros(0, dtype=torch.bool)
    noisy = torch.multinomial(matrix[labels], 1, generator=gen).squeeze(1)
    return noisy, noisy != labels


def _corrupt_named(
    labels: Tensor, rate: float, kind: str, num_classes: int, seed: int
) -> tuple[Tensor, Tensor]:
    if kind == "cifar10_asymmetric" and num_classes != 10:
        raise ValueError(f"kind='cifar10_asymmetric' is the CIFAR-10 convention: 10 classes, got {num_classes}")
    gen = generator(seed)
    n = labels.numel()
    n_corrupt = round(rate * n)
    noisy = labels.clone()
    if n_corrupt == 0:
        return noisy, torch.zeros(n, dtype=torch.bool)
    if num_classes < 2 and kind in ("symmetric", "pairflip"):
        raise ValueError(f"kind={kind!r} needs num_classes >= 2 to change a label, got {num_classes}")
    if kind == "cifar10_asymmetric":
        for source, target in CIFAR10_ASYMMETRIC_MAP.items():  # per class: exactly rate * n_j of each source class
            members = (labels == source).nonzero().flatten()
            flipped = members[torch.randperm(members.numel(), generator=gen)[: round(rate * members.numel())]]
            noisy[flipped] = target
        return noisy, noisy != labels
    chosen = torch.randperm(n, generator=gen)[:n_corrupt]
    if kind == "symmetric":
        # An offset uniform in {1, ..., C-1} maps y to a class uniform among the C-1 others.
        offset = torch.randint(1, num_classes, (n_corrupt,), generator=gen)
        noisy[chosen] = (labels[chosen] + offset) % num_classes
    elif kind == "symmetric_all":
        noisy[chosen] = torch.randint(0, num_classes, (n_corrupt,), generator=gen)
    else:  # pairflip
        noisy[chosen] = (labels[chosen] + 1) % num_classes
    return noisy, noisy != labels


def _as_transition_matrix(kind: Any) -> Tensor:
    try:
        matrix = torch.as_tensor(kind, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"kind must be one of {', '.join(repr(k) for k in NOISE_KINDS)} or a C x C transition matrix; "
            f"could not read {type(kind).__name__} as a matrix ({err})"
        ) from err
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"kind (transition matrix) must be a non-empty square C x C matrix, got shape "
                         f"{tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("kind (transition matrix) holds non-finite entries")
    for row_index, row in enumerate(matrix):
        if bool((row < 0).any()):
            raise ValueError(f"kind (transition matrix) row {row_index} has negative entries: {row.tolist()}")
        if abs(float(row.sum()) - 1.0) > 1e-6:
            total = float(row.sum())
            raise ValueError(f"kind (transition matrix) row {row_index} sums to {total:.8g}, not 1")
    return matrix
