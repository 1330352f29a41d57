import math

import pytest
import torch
from torch.nn import functional as F

from lightning_reweight.functional import logit_adjustment_offsets
from lightning_reweight.losses import LogitAdjustedLoss


def reference(logits, target, counts, tau):
    total = sum(counts)
    out = []
    for z, y in zip(logits.double().tolist(), target.tolist()):
        adj = [zj + tau * math.log(counts[j] / total) for j, zj in enumerate(z)]
        top = max(adj)
        out.append(top + math.log(sum(math.exp(a - top) for a in adj)) - adj[y])
    return out


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_matches_formula(tau):
    torch.manual_seed(1)
    counts = [900, 300, 50, 5]
    logits, target = torch.randn(20, 4), torch.randint(0, 4, (20,))
    expected = reference(logits, target, counts, tau)
    per = LogitAdjustedLoss(counts, tau=tau, reduction="none")(logits, target)
    assert torch.allclose(per.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert float(LogitAdjustedLoss(counts, tau=tau)(logits, target)) == pytest.approx(sum(expected) / 20, rel=1e-5)


def test_tau_zero_is_cross_entropy():
    logits, target = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    assert torch.allclose(LogitAdjustedLoss([5, 3, 1], tau=0.0)(logits, target), F.cross_entropy(logits, target))


def test_offsets_are_log_prior_buffer():
    loss = LogitAdjustedLoss([6, 3, 1])
    assert torch.allclose(loss.offsets.exp(), torch.tensor([0.6, 0.3, 0.1]))
    assert "offsets" in loss.state_dict()
    assert torch.allclose(logit_adjustment_offsets([6, 3, 1], tau=2.0), 2 * torch.log(torch.tensor([0.6, 0.3, 0.1])))


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="cls_num_list"):
        LogitAdjustedLoss([4, 0])
    with pytest.raises(ValueError, match="cls_num_list"):
        LogitAdjustedLoss([4, -1])


def test_bf16_finite():
    out = LogitAdjustedLoss([1000, 1], reduction="none")(torch.randn(4, 2).bfloat16() * 50, torch.tensor([0, 1, 1, 0]))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_counts_given_later():
    """``LogitAdjustedLoss(cls_num_list=None)``: refuses to run, then is cross-entropy on z + tau log(pi)."""
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    loss = LogitAdjustedLoss(tau=0.5, reduction="none")
    with pytest.raises(RuntimeError, match="set_class_counts"):
        loss(logits, target)
    loss.set_class_counts([6, 3, 1])
    prior = torch.tensor([0.6, 0.3, 0.1])
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits + 0.5 * prior.log(), target, reduction="none"),
                          atol=1e-6)
    fresh = LogitAdjustedLoss(tau=0.5)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.offsets, loss.offsets)


@pytest.mark.parametrize("tau", [math.nan, math.inf])
def test_non_finite_tau_is_refused(tau):
    """It made every offset, and so every loss value, nan."""
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss([3, 1], tau=tau)
