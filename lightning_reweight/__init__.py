"""lightning_reweight: sample reweighting for noisy labels and class imbalance, for PyTorch Lightning.

Importing this package imports torch, lightning and torchmetrics only; torchvision, wandb, matplotlib and
scikit-learn are imported lazily by the functions that need them.
"""

__version__ = "0.1.0"

from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.contract import ReweightingMixin, SampleWeighting, WeightingContext

__all__ = ["ReweightClassifier", "ReweightingMixin", "SampleWeighting", "WeightingContext", "__version__"]
