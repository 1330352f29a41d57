"""Small reference backbones."""

from lightning_reweight.models.mlp import MLP
from lightning_reweight.models.normalized_linear import NormalizedLinear
from lightning_reweight.models.resnet_cifar import ResNetCifar, resnet32

__all__ = ["MLP", "NormalizedLinear", "ResNetCifar", "resnet32"]
