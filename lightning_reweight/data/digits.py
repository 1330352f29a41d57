"""scikit-learn's bundled 8x8 handwritten digits as a reweighting datamodule (no download)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_reweight.data._checks import check_real
from lightning_reweight.data.datamodule import ReweightDataModule
from lightning_reweight.data.indexed import TensorClassificationDataset
from lightning_reweight.data.split import stratified_split

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """Load scikit-learn's 8x8 digits as ``(inputs, targets)`` tensors.

    Returns:
        ``inputs`` of shape ``(1797, 1, 8, 8)``, ``float32``, pixel values divided by 16 (so in ``[0, 1]``),
        and ``targets`` of shape ``(1797,)``, ``int64``, in the order of ``sklearn.datasets.load_digits``.

    Raises:
        ImportError: when scikit-learn is not installed.

    Example:
        >>> x, y = load_digits_tensors()
        >>> tuple(x.shape), float(x.max()), y[:3].tolist()
        ((1797, 1, 8, 8), 1.0, [0, 1, 2])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'The digits datamodule needs scikit-learn: pip install "lightning-reweight[digits]"'
        ) from err
    bunch = load_digits()
    inputs = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return inputs, torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(ReweightDataModule):
    """The 1,797 8x8 handwritten digits of scikit-learn (10 classes), bundled with scikit-learn.

    The test set is a stratified ``test_fraction`` of the images drawn with the fixed seed
    :attr:`TEST_SPLIT_SEED` (independent of ``seed``), so every seed and scenario shares it; the other
    images form the training pool that :class:`ReweightDataModule` splits into validation, meta and (noisy,
    long-tailed) training sets. Inputs are ``float32`` tensors of shape ``(1, 8, 8)`` in ``[0, 1]``.
    ``pool_source_indices`` / ``test_source_indices`` map pool / test positions to rows of
    ``sklearn.datasets.load_digits()``.

    Args:
        test_fraction: stratified fraction of the 1,797 images used as the test set, in ``(0, 1)``.
        **kwargs: forwarded to :class:`ReweightDataModule` (``noise_rate``, ``imbalance_ratio``, ...).

    Example:
        >>> dm = DigitsDataModule(noise_rate=0.4, meta_per_class=5)
        >>> dm.setup()
        >>> len(dm.test_dataset), len(dm.meta_dataset), dm.num_classes
        (359, 50, 10)
    """

    #: Seed of the train/test split, shared by every datamodule instance.
    TEST_SPLIT_SEED: int = 12345
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(self, test_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_fraction = check_real("test_fraction", test_fraction, low=0.0, high=1.0)
        if self.test_fraction == 0.0:
            raise ValueError("test_fraction must lie in (0, 1), got 0.0")
        self._tensors: tuple[Tensor, Tensor] | None = None

    def _split(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._tensors is None:
            self._tensors = load_digits_tensors()
        inputs, targets = self._tensors
        test_idx, pool_idx = stratified_split(targets, [self.test_fraction], seed=self.TEST_SPLIT_SEED)
        self.test_source_indices, self.pool_source_indices = test_idx, pool_idx
        return inputs, targets, test_idx, pool_idx

    def load_train_pool(self) -> tuple[Dataset, Tensor]:
        """The digits outside the fixed test split, as ``(dataset, targets)``."""
        inputs, targets, _, pool_idx = self._split()
        return TensorClassificationDataset(inputs[pool_idx], targets[pool_idx]), targets[pool_idx]

    def load_test_set(self) -> Dataset:
        """The fixed stratified test split."""
        inputs, targets, test_idx, _ = self._split()
        return TensorClassificationDataset(inputs[test_idx], targets[test_idx])
