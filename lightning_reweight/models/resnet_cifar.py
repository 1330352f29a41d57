"""The CIFAR ResNet-32 of He et al. (2016), as used by LDAM-DRW and Meta-Weight-Net."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from lightning_reweight.models.normalized_linear import NormalizedLinear

__all__ = ["BasicBlock", "ResNetCifar", "resnet32"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; option-A shortcut (strided identity, zero-padded channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        """Identity, subsampled by the stride and zero-padded to the new channel count (no parameters)."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet: a 3x3 stem, three stages of basic blocks (16/32/64 channels), global pooling, a head.

    Args:
        num_blocks: blocks per stage (5 gives ResNet-32: 6 * 5 + 2 layers).
        num_classes: output classes.
        normalized_head: use :class:`NormalizedLinear` (cosine logits, for LDAM) instead of ``nn.Linear``.
        in_channels: input channels.

    Example:
        >>> import torch
        >>> model = resnet32(num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, num_blocks: int = 5, num_classes: int = 10, normalized_head: bool = False, in_channels: int = 3
    ) -> None:
        super().__init__()
        if num_blocks < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError(
                f"need num_blocks >= 1, num_classes >= 2 and in_channels >= 1, got {num_blocks}, {num_classes}, "
                f"{in_channels}"
            )
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(num_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_features = 64
        self.linear: nn.Module = NormalizedLinear(64, num_classes) if normalized_head else nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: Tensor) -> Tensor:
        """Pooled 64-dimensional features."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.linear(self.features(x))


def resnet32(num_classes: int = 10, normalized_head: bool = False, in_channels: int = 3) -> ResNetCifar:
    """ResNet-32 for 32x32 inputs (about 0.46M parameters).

    Args:
        num_classes: output classes.
        normalized_head: cosine logits (:class:`NormalizedLinear`, for LDAM) instead of ``nn.Linear``.
        in_channels: input channels (3 for CIFAR, 1 for grey images).

    Returns:
        A :class:`ResNetCifar` with 5 blocks per stage.

    Example:
        >>> import torch
        >>> model = resnet32(num_classes=100, in_channels=1)
        >>> model(torch.zeros(2, 1, 32, 32)).shape, sum(p.numel() for p in model.parameters()) // 1000
        (torch.Size([2, 100]), 469)
    """
    return ResNetCifar(5, num_classes, normalized_head, in_channels)
