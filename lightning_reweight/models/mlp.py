"""A multi-layer perceptron backbone."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected network: flatten, ``Linear -> ReLU (-> Dropout)`` per hidden layer, linear output.

    Args:
        in_features: input size after flattening (64 for 8x8 digits).
        num_classes: output size.
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer (0 disables it).
        batch_norm: insert ``BatchNorm1d`` after each hidden linear layer.

    Example:
        >>> import torch
        >>> MLP(64, 10, hidden=(32,))(torch.zeros(2, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2:
            raise ValueError(f"need in_features >= 1 and num_classes >= 2, got {in_features}, {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.out_features = width
        self.classifier: nn.Module = nn.Linear(width, num_classes)  # replaceable (e.g. a NormalizedLinear head)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(B, num_classes)``."""
        return self.classifier(self.features(x))
