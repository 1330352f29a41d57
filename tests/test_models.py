"""Reference backbones against hand counts and formulas."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_reweight.models import MLP, NormalizedLinear, ResNetCifar, resnet32


def _resnet_param_count(num_blocks=5, classes=10):
    # stem conv + BN, then per block two 3x3 convs and two BNs (gamma, beta), then the linear head
    total = 3 * 16 * 9 + 2 * 16
    in_c = 16
    for c in (16, 32, 64):
        for _ in range(num_blocks):
            total += in_c * c * 9 + c * c * 9 + 2 * 2 * c
            in_c = c
    return total + 64 * classes + classes


def test_resnet32_has_the_published_size_and_shape():
    model = resnet32(num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert n == _resnet_param_count()
    assert 0.45e6 < n < 0.47e6  # "about 0.46M parameters"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 5 * 2  # 31 convolutions + 1 linear = 32 weighted layers
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_shortcut_is_zero_padded_identity():
    block = ResNetCifar(1).layer2[0]
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(s[:, :8]) == 0 and torch.count_nonzero(s[:, 24:]) == 0


def test_normalized_linear_is_cosine_similarity():
    head = NormalizedLinear(5, 3)
    x = torch.randn(4, 5)
    expected = F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=2)
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert not any(name.endswith("bias") for name, _ in head.named_parameters())
    normalized = resnet32(normalized_head=True)
    assert isinstance(normalized.linear, NormalizedLinear)


def test_mlp_layers():
    m = MLP(64, 10, hidden=(32, 16), dropout=0.1, batch_norm=True)
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(x, nn.BatchNorm1d) for x in m.modules()) == 2
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_normalized_linear_on_token_features_normalises_each_vector():
    """(B, T, F) features: the head applied token by token, cosines within [-1, 1] (it normalised dim 1)."""
    torch.manual_seed(0)
    head = NormalizedLinear(6, 3)
    x = torch.randn(2, 5, 6) * 4
    out = head(x)
    per_token = torch.stack([head(x[:, t]) for t in range(5)], dim=1)
    torch.testing.assert_close(out, per_token)
    assert float(out.abs().max()) <= 1 + 1e-6


def test_bad_sizes_are_refused_when_the_model_is_built():
    """ResNetCifar(num_blocks=0) built and failed in forward with a matmul shape error; NormalizedLinear(0, 3)
    raised ZeroDivisionError."""
    with pytest.raises(ValueError, match="num_blocks"):
        ResNetCifar(num_blocks=0)
    with pytest.raises(ValueError, match="in_features"):
        NormalizedLinear(0, 3)


def test_resnet32_takes_grey_images():
    model = resnet32(num_classes=4, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)
