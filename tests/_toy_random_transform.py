"""A toy ReweightDataModule whose training transform is random (tests of the loaders' worker seeds)."""

from __future__ import annotations

import torch

from lightning_reweight.data import ReweightDataModule
from lightning_reweight.data.indexed import TensorClassificationDataset


def draw(x: torch.Tensor) -> torch.Tensor:
    """A random "augmentation": adds a fresh draw of the worker's torch generator."""
    return x + torch.rand(1)


class Toy(ReweightDataModule):
    num_classes = 2
    train_transform = staticmethod(draw)

    def load_train_pool(self):
        y = torch.arange(2).repeat(45)
        return TensorClassificationDataset(torch.zeros(90, 1), y), y

    def load_test_set(self):
        return TensorClassificationDataset(torch.zeros(4, 1), torch.arange(2).repeat(2))
