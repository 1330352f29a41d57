"""The normalised (cosine) linear head used with LDAM."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["NormalizedLinear"]


class NormalizedLinear(nn.Module):
    """Cosine logits: unit-norm features times unit-norm class vectors, no bias.

    Outputs lie in ``[-1, 1]``; a margin loss such as LDAM rescales them (``s = 30``).

    Args:
        in_features: feature size.
        out_features: number of classes.

    Example:
        >>> import torch
        >>> head = NormalizedLinear(16, 4)
        >>> bool(head(torch.randn(3, 16)).abs().max() <= 1.0 + 1e-6)
        True
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"need in_features >= 1 and out_features >= 1, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """Cosine similarity between each feature vector (the last dimension) and each class vector."""
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
