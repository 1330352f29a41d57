"""Map-style dataset wrappers: sample indices, tensors, and relabelled subsets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_reweight.data._checks import as_labels

__all__ = ["IndexedDataset", "RelabeledSubset", "TensorClassificationDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style ``(x, y)`` dataset so that it yields ``(x, y, index)``.

    The index lets per-sample methods (loss histories, noise masks, learned weights) address a sample across
    epochs. After default collation a batch is ``(inputs, targets, indices)`` with ``indices`` an ``int64``
    tensor.

    Args:
        dataset: a map-style dataset whose items are ``(x, y)`` pairs.

    Example:
        >>> base = TensorClassificationDataset(torch.zeros(3, 2), torch.tensor([0, 1, 0]))
        >>> x, y, i = IndexedDataset(base)[2]
        >>> int(y), i
        (0, 2)
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset with __getitem__ and __len__, got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"IndexedDataset expects the wrapped dataset to yield (x, y) pairs, got "
                            f"{type(item).__name__}")
        return item[0], item[1], int(index)


class TensorClassificationDataset(Dataset):
    """A map-style classification dataset backed by an input tensor and a label tensor.

    Args:
        inputs: tensor of shape ``(N, ...)``.
        targets: non-negative integer class labels of shape ``(N,)`` (integer-valued floats accepted); stored as
            ``int64``.
        transform: optional callable applied to each input on access.

    Example:
        >>> ds = TensorClassificationDataset(torch.ones(4, 1, 2, 2), torch.tensor([3, 1, 0, 2]))
        >>> x, y = ds[0]
        >>> tuple(x.shape), int(y), len(ds)
        ((1, 2, 2), 3, 4)
    """

    def __init__(
        self, inputs: Tensor, targets: Tensor | Sequence[int], transform: Callable[[Any], Any] | None = None
    ) -> None:
        if not isinstance(inputs, Tensor) or inputs.dim() == 0:
            raise TypeError("inputs must be a Tensor of shape (N, ...)")
        targets = as_labels(targets)  # 1-D, integer-valued, non-negative (float labels 1.0 pass, 1.7 does not)
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets has {targets.shape[0]} labels but inputs has {inputs.shape[0]} rows")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, Tensor]:
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]


def _as_indices(indices: Tensor | Sequence[int], size: int | None) -> Tensor:
    """``indices`` as a 1-D ``int64`` tensor, checked to be integers in ``[0, size)``."""
    idx = indices.detach().cpu() if isinstance(indices, Tensor) else torch.as_tensor(indices)
    if idx.dim() > 1 or (idx.numel() and (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)):
        raise TypeError(f"indices must be a 1-D sequence of ints, got dtype {idx.dtype} and shape {tuple(idx.shape)}")
    idx = idx.long().reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or (size is not None and int(idx.max()) >= size)):
        raise ValueError(f"indices must lie in [0, {size}), the wrapped dataset's positions; got "
                         f"{int(idx.min())}..{int(idx.max())}")
    return idx


class RelabeledSubset(Dataset):
    """A subset of a map-style ``(x, y)`` dataset with its own labels and an optional input transform.

    Item ``i`` is ``(transform(x_j), targets[i])`` where ``x_j`` is the input of ``dataset[indices[i]]``; the
    wrapped dataset's own label is ignored when ``targets`` is given. Used to give a training split noisy
    labels and a different transform than the evaluation splits of the same pool.

    Args:
        dataset: the wrapped map-style dataset yielding ``(x, y)``.
        indices: indices into ``dataset``, integers in ``[0, len(dataset))`` (1-D).
        targets: integer labels of the subset (same length as ``indices``; integer-valued floats accepted), or
            ``None`` to keep the original ones.
        transform: optional callable applied to each input.

    Example:
        >>> pool = TensorClassificationDataset(torch.arange(5.0).view(5, 1), torch.tensor([0, 0, 1, 1, 1]))
        >>> sub = RelabeledSubset(pool, torch.tensor([4, 1]), targets=torch.tensor([2, 2]))
        >>> [(float(x), int(y)) for x, y in sub]
        [(4.0, 2), (1.0, 2)]
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: Tensor | Sequence[int],
        targets: Tensor | Sequence[int] | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.dataset = dataset
        self.indices = _as_indices(indices, len(dataset) if hasattr(dataset, "__len__") else None)
        if targets is not None:
            targets = as_labels(targets)
            if targets.shape[0] != self.indices.shape[0]:
                raise ValueError(f"targets has {targets.shape[0]} labels but indices has "
                                 f"{self.indices.shape[0]} entries")
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.dataset[int(self.indices[index])]
        if self.transform is not None:
            x = self.transform(x)
        if self.targets is not None:
            y = self.targets[index]
        return x, y
