"""Data toolkit: label noise, long-tail subsampling, balanced splits, indexed datasets and datamodules.

Importing this package never imports torchvision or scikit-learn; they are imported when a digits or CIFAR
datamodule loads its data.
"""

from lightning_reweight.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_reweight.data.datamodule import ReweightDataModule
from lightning_reweight.data.digits import DigitsDataModule, load_digits_tensors
from lightning_reweight.data.indexed import IndexedDataset, RelabeledSubset, TensorClassificationDataset
from lightning_reweight.data.longtail import IMBALANCE_PROFILES, class_counts, long_tailed_counts, long_tailed_indices
from lightning_reweight.data.noise import NOISE_KINDS, inject_label_noise
from lightning_reweight.data.split import balanced_meta_split, stratified_split

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "IMBALANCE_PROFILES",
    "IndexedDataset",
    "NOISE_KINDS",
    "RelabeledSubset",
    "ReweightDataModule",
    "TensorClassificationDataset",
    "balanced_meta_split",
    "class_counts",
    "inject_label_noise",
    "load_digits_tensors",
    "long_tailed_counts",
    "long_tailed_indices",
    "stratified_split",
]
