import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import ReweightClassifier
from lightning_reweight.functional import class_balanced_weights, ldam_margins
from lightning_reweight.losses import LDAMLoss
from lightning_reweight.models import MLP, NormalizedLinear

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def reference_ldam(logits, target, counts, max_m, s, weight=None):
    """LDAM written out per sample in float64: margins, target-only subtraction, scale, log-sum-exp."""
    raw = [n ** -0.25 for n in counts]
    margins = [m * max_m / max(raw) for m in raw]
    losses, ws = [], []
    for z, y in zip(logits.double().tolist(), target.tolist()):
        adj = [s * (zj - (margins[j] if j == y else 0.0)) for j, zj in enumerate(z)]
        top = max(adj)
        lse = top + math.log(sum(math.exp(a - top) for a in adj))
        w = 1.0 if weight is None else float(weight[y])
        losses.append(w * (lse - adj[y]))
        ws.append(w)
    return losses, ws


def test_margins_cifar10_lt100():
    m = ldam_margins(CIFAR10_LT_100, max_m=0.5)
    expected = [0.5 * (50 / n) ** 0.25 for n in CIFAR10_LT_100]
    assert torch.allclose(m, torch.tensor(expected), atol=1e-6)
    assert round(float(m[0]), 3) == 0.158
    assert float(m[-1]) == pytest.approx(0.5)
    assert bool((m[1:] > m[:-1]).all())  # rarer classes get larger margins


def test_class_balanced_weights_formula():
    counts = CIFAR10_LT_100
    for beta in (0.9, 0.99, 0.999, 0.9999):
        raw = [(1 - beta) / (1 - beta**n) for n in counts]
        expected = torch.tensor([r * len(counts) / sum(raw) for r in raw])
        assert torch.allclose(class_balanced_weights(counts, beta), expected.float(), rtol=1e-5)
    assert torch.equal(class_balanced_weights(counts, 0.0), torch.ones(10))
    assert float(class_balanced_weights(counts, 0.9999).sum()) == pytest.approx(10.0, rel=1e-6)


@pytest.mark.parametrize("use_weight", [False, True])
def test_ldam_matches_formula(use_weight):
    torch.manual_seed(0)
    counts = [500, 120, 40, 7]
    logits = torch.randn(16, 4)
    target = torch.randint(0, 4, (16,))
    weight = torch.tensor([0.2, 0.7, 1.3, 1.8]) if use_weight else None
    losses, ws = reference_ldam(logits, target, counts, 0.4, 10.0, weight)
    mean = LDAMLoss(counts, max_m=0.4, s=10.0, weight=weight)(logits, target)
    assert float(mean) == pytest.approx(sum(losses) / sum(ws), rel=1e-5)
    per = LDAMLoss(counts, max_m=0.4, s=10.0, weight=weight, reduction="none")(logits, target)
    assert torch.allclose(per.double(), torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    total = LDAMLoss(counts, max_m=0.4, s=10.0, weight=weight, reduction="sum")(logits, target)
    assert float(total) == pytest.approx(sum(losses), rel=1e-5)


def test_weight_buffer_set_later_survives_state_dict():
    loss = LDAMLoss(CIFAR10_LT_100)
    assert torch.equal(loss.weight, torch.ones(10))
    assert {"margins", "weight"} <= set(loss.state_dict())
    loss.weight.copy_(class_balanced_weights(CIFAR10_LT_100))
    fresh = LDAMLoss(CIFAR10_LT_100)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.weight, loss.weight)


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -2, 3], []])
def test_bad_counts_raise(counts):
    with pytest.raises(ValueError, match="cls_num_list"):
        LDAMLoss(counts)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_m"):
        LDAMLoss([3, 2], max_m=0.0)
    with pytest.raises(ValueError, match="reduction"):
        LDAMLoss([3, 2], reduction="batchmean")
    with pytest.raises(ValueError, match="weight"):
        LDAMLoss([3, 2], weight=[1.0, 2.0, 3.0])


def test_bf16_logits_finite_and_fp32():
    torch.manual_seed(0)
    logits = (torch.rand(32, 10) * 2 - 1).bfloat16()
    out = LDAMLoss(CIFAR10_LT_100, reduction="none")(logits, torch.randint(0, 10, (32,)))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_module_keeps_fp32_constants(dtype):
    """precision="bf16-true"/"16-true" cast the module: margins and weights stay the fp32 values of the formula."""
    from lightning_reweight.losses import LogitAdjustedLoss

    counts = [100, 10, 1]
    weight = torch.tensor([0.1581, 0.2811, 2.5607])
    ldam = LDAMLoss(counts, weight=weight, reduction="none").to(dtype)
    assert ldam.margins.dtype == ldam.weight.dtype == torch.float32
    assert torch.equal(ldam.margins, ldam_margins(counts, 0.5)) and torch.equal(ldam.weight, weight)
    logits, target = torch.randn(4, 3).to(dtype), torch.tensor([0, 1, 2, 2])
    reference = LDAMLoss(counts, weight=weight, reduction="none")(logits.float(), target)
    torch.testing.assert_close(ldam(logits, target), reference, rtol=0, atol=0)
    la = LogitAdjustedLoss(counts, reduction="none").to(dtype)
    assert la.offsets.dtype == torch.float32
    torch.testing.assert_close(la(logits, target), LogitAdjustedLoss(counts, reduction="none")(logits.float(), target))


def test_bf16_true_training_runs():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    model = ReweightClassifier(MLP(64, 3, hidden=(16,)), 3, criterion=LDAMLoss([20, 8, 4], reduction="none"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert model.criterion.margins.dtype == torch.float32
    assert next(model.backbone.parameters()).dtype == torch.bfloat16


def test_bf16_mixed_training_loss_finite():
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    backbone = MLP(64, 4, hidden=(16,))
    backbone.classifier = NormalizedLinear(16, 4)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    model = ReweightClassifier(backbone, 4, criterion=LDAMLoss([40, 15, 6, 3], reduction="none"), lr=0.05)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record()])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)


def test_gradient_pushes_rare_class_harder():
    # Same logits, the margin of the rare class makes its loss larger than the common class's.
    loss = LDAMLoss([1000, 10], max_m=0.5, s=30.0, reduction="none")
    z = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    out = loss(z, torch.tensor([0, 1]))
    assert float(out[1]) > float(out[0])
    assert isinstance(loss, nn.Module)


def test_counts_given_later_give_the_formulas_loss_and_refuse_to_run_before():
    """``LDAMLoss(cls_num_list=None)`` (a config file's LDAM): no loss before counts, the paper's loss after."""
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    counts, weight = [40, 9, 2], [0.5, 1.0, 2.0]
    loss = LDAMLoss(max_m=0.4, s=7.0, weight=weight, reduction="none")
    assert loss.cls_num_list is None and not loss.has_class_counts and loss.num_classes is None
    with pytest.raises(RuntimeError, match="set_class_counts"):
        loss(logits, target)
    loss.set_class_counts(counts)
    ref, _ = reference_ldam(logits, target, counts, 0.4, 7.0, weight)
    assert torch.allclose(loss(logits, target).double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)
    assert loss.cls_num_list == (40, 9, 2)
    with pytest.raises(ValueError, match="3 classes"):
        loss.set_class_counts([5, 4])
    with pytest.raises(ValueError, match="one per class"):
        LDAMLoss(weight=[1.0, 2.0]).set_class_counts(counts)
    with pytest.raises(ValueError, match="max_m"):
        LDAMLoss(max_m=0.0)


def test_loss_waiting_for_counts_takes_them_from_a_state_dict():
    """Loading a trained LDAM's state into ``LDAMLoss()`` (inference from a checkpoint) gives its margins and
    class weights, hence its losses."""
    trained = LDAMLoss(CIFAR10_LT_100, weight=class_balanced_weights(CIFAR10_LT_100), reduction="none")
    later = LDAMLoss(reduction="none")
    later.load_state_dict(trained.state_dict())
    assert later.has_class_counts and later.cls_num_list is None
    logits, target = torch.randn(8, 10), torch.arange(8)
    ref, _ = reference_ldam(logits, target, CIFAR10_LT_100, 0.5, 30.0, class_balanced_weights(CIFAR10_LT_100))
    assert torch.allclose(later(logits, target).double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-5)


def test_integer_targets_of_any_width_give_the_long_target_loss():
    """uint8 targets indexed the margins as a boolean mask (a confusing shape error, or scatter's dtype error)."""
    loss = LDAMLoss([100, 10, 1], reduction="none")
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    # reference: the formula with long targets
    z = logits.clone()
    z[torch.arange(4), y] -= loss.margins[y]
    reference = nn.functional.cross_entropy(30.0 * z, y, reduction="none")
    for dtype in (torch.uint8, torch.int32, torch.int16):
        assert torch.allclose(loss(logits, y.to(dtype)), reference, rtol=1e-6)
    with pytest.raises(ValueError, match="integer class indices"):
        loss(logits, y.float())


@pytest.mark.parametrize(
    "kwargs", [{"s": math.nan}, {"s": math.inf}, {"max_m": math.inf}, {"max_m": math.nan}, {"weight": [1, math.nan, 1]}]
)
def test_non_finite_arguments_are_refused(kwargs):
    """They made every loss value nan (or every margin inf) without a word."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LDAMLoss([5, 3, 1], **kwargs)


def test_counts_that_are_not_integers_are_kept_as_given():
    loss = LDAMLoss([3.5, 2.0])
    assert loss.cls_num_list == (3.5, 2)
    assert torch.allclose(loss.margins, ldam_margins([3.5, 2.0], 0.5))
