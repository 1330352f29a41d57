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


# ---------------------------------------------------------------------------- forward passes against their formulas
def test_mlp_forward_is_linear_batchnorm_relu_per_hidden_layer():
    """Written out: h = relu(BN(x W^T + b)) per hidden layer (BN with the batch's biased variance in train mode),
    then the linear output; the ReLU and the order BatchNorm -> ReLU matter."""
    torch.manual_seed(0)
    m = MLP(6, 3, hidden=(5, 4), batch_norm=True)
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    norms = [x for x in m.modules() if isinstance(x, nn.BatchNorm1d)]
    for bn in norms:  # non-trivial affine parameters, so that no order of the layers coincides with another
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    x = torch.randn(8, 2, 3)
    h = x.reshape(8, 6)
    for lin, bn in zip(linears[:-1], norms):
        z = h @ lin.weight.t() + lin.bias
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
        h = torch.clamp(z, min=0.0)
    expected = h @ linears[-1].weight.t() + linears[-1].bias
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_mlp_dropout_drops_hidden_units_with_its_probability():
    """Train mode: each hidden activation is zeroed with probability p, the others scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    p = 0.3
    m = MLP(16, 2, hidden=(4000,), dropout=p)
    x = torch.randn(2, 16)
    kept = m.eval().features(x)
    dropped = m.train().features(x)
    active = kept > 0
    zeroed = (dropped[active] == 0).float().mean()
    assert float(zeroed) == pytest.approx(p, abs=0.03)  # ~3000 active units: sd ~0.008
    survivors = dropped[active] != 0
    torch.testing.assert_close(dropped[active][survivors], kept[active][survivors] / (1 - p))


def _reference_shortcut(x, stride, planes):
    # option A (He et al. 2016): subsample by the stride, zero channels added half before and half after
    x = x[:, :, ::stride, ::stride]
    pad = planes - x.shape[1]
    zeros = x.new_zeros(x.shape[0], pad // 2, x.shape[2], x.shape[3])
    rest = x.new_zeros(x.shape[0], pad - pad // 2, x.shape[2], x.shape[3])
    return torch.cat([zeros, x, rest], dim=1)


@pytest.mark.parametrize(("in_planes", "planes", "stride"), [(16, 16, 1), (16, 32, 2)])
def test_basic_block_is_relu_of_the_residual_sum(in_planes, planes, stride):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)): the ReLU after the sum, both BatchNorms used."""
    from lightning_reweight.models.resnet_cifar import BasicBlock

    torch.manual_seed(0)
    block = BasicBlock(in_planes, planes, stride).eval()
    for bn in (block.bn1, block.bn2):  # running statistics and affine parameters away from the identity
        nn.init.uniform_(bn.running_mean, -0.5, 0.5)
        nn.init.uniform_(bn.running_var, 0.5, 2.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)

    def bn(z, m):
        shape = (1, -1, 1, 1)
        return ((z - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) * m.weight.view(shape)
                + m.bias.view(shape))

    x = torch.randn(2, in_planes, 8, 8)
    h = F.relu(bn(F.conv2d(x, block.conv1.weight, stride=stride, padding=1), block.bn1))
    h = bn(F.conv2d(h, block.conv2.weight, stride=1, padding=1), block.bn2)
    expected = F.relu(h + _reference_shortcut(x, stride, planes))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_resnet32_stages_have_the_published_feature_map_sizes():
    """He et al. (2016), CIFAR ResNets: the 3 stages of n blocks work on 32x32 / 16x16 / 8x8 maps with 16 / 32 / 64
    filters, the downsampling done by the first block of stages 2 and 3."""
    model = resnet32().eval()
    shapes = []
    for stage in (model.layer1, model.layer2, model.layer3):
        for block in stage:
            block.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert shapes == [(16, 32, 32)] * 5 + [(32, 16, 16)] * 5 + [(64, 8, 8)] * 5


def test_resnet_forward_is_stem_stages_global_average_pool_and_head():
    """logits = head(mean over the 8x8 map of layer3(layer2(layer1(relu(bn1(conv1(x))))))) (global average pooling,
    the stem's ReLU included)."""
    torch.manual_seed(0)
    model = ResNetCifar(num_blocks=1, num_classes=4).eval()
    nn.init.uniform_(model.bn1.running_mean, -0.5, 0.5)  # the stem's BN away from the identity: its ReLU matters
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = F.relu(model.bn1(model.conv1(x)))
        maps = model.layer3(model.layer2(model.layer1(stem)))
        pooled = maps.mean(dim=(2, 3))
        torch.testing.assert_close(model.features(x), pooled)
        torch.testing.assert_close(model(x), pooled @ model.linear.weight.t() + model.linear.bias)


def test_resnet_weights_are_kaiming_normal():
    """Every convolution and the linear head start from He et al.'s (2015) normal init, std sqrt(2 / fan_in) (as the
    LDAM-DRW reference's ResNet-32; PyTorch's own Linear init has std 1 / sqrt(3 fan_in), 2.4 times smaller)."""
    torch.manual_seed(0)
    model = resnet32(num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 32
    for layer in layers:
        w = layer.weight.detach()
        fan_in = w[0].numel()
        assert float(w.mean()) == pytest.approx(0.0, abs=4 * (2 / fan_in) ** 0.5 / w.numel() ** 0.5)
        assert float(w.std()) == pytest.approx((2 / fan_in) ** 0.5, rel=0.12), layer  # >= 432 weights: sd < 3.5%
