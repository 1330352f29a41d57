import math

import pytest
import torch

from lightning_reweight.functional import dro_objective, dro_weights, log_mean_exp


def test_dro_weights_match_written_out_softmax():
    losses = torch.tensor([0.2, 1.5, 3.0, 0.7])
    lam = 2.0
    e = [math.exp(v / lam) for v in losses.tolist()]
    expected = torch.tensor([v / sum(e) for v in e])
    assert torch.allclose(dro_weights(losses, lam), expected, atol=1e-6)
    assert torch.allclose(dro_weights(losses, lam, normalization="mean"), 4 * expected, atol=1e-6)


def test_negative_lam_downweights_high_losses():
    losses = torch.tensor([0.1, 2.0, 5.0])
    w = dro_weights(losses, -1.0)
    assert w[0] > w[1] > w[2]
    w_pos = dro_weights(losses, 1.0)
    assert w_pos[0] < w_pos[1] < w_pos[2]


def test_lam_none_is_uniform_and_zero_rejected():
    losses = torch.tensor([1.0, 9.0, 3.0])
    assert torch.equal(dro_weights(losses, None), torch.full((3,), 1 / 3))
    assert torch.equal(dro_weights(losses, None, normalization="mean"), torch.ones(3))
    with pytest.raises(ValueError, match="lam"):
        dro_weights(losses, 0.0)
    with pytest.raises(ValueError, match="normalization"):
        dro_weights(losses, 1.0, normalization="max")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.1, -0.1])
def test_no_overflow_with_large_losses(dtype, lam):
    losses = torch.tensor([100.0, 99.0, 0.0, 50.0]).to(dtype)
    w = dro_weights(losses, lam)
    obj = dro_objective(losses, lam)
    assert torch.isfinite(w).all() and torch.isfinite(obj)
    assert w.dtype == torch.float32
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    # lam=0.1 puts (almost) all the weight on the largest loss, lam=-0.1 on the smallest
    assert int(w.argmax()) == (0 if lam > 0 else 2)


def test_objective_closed_form_and_bounds():
    losses = torch.tensor([0.5, 1.0, 4.0])
    lam = 1.5
    expected = lam * math.log(sum(math.exp(v / lam) for v in losses.tolist()) / 3)
    assert math.isclose(float(dro_objective(losses, lam)), expected, rel_tol=1e-6)
    # between mean and max for lam > 0, between min and mean for lam < 0
    assert losses.mean() <= dro_objective(losses, lam) <= losses.max()
    assert losses.min() <= dro_objective(losses, -lam) <= losses.mean()
    assert math.isclose(float(dro_objective(losses, None)), float(losses.mean()), rel_tol=1e-7)


def test_objective_gradient_is_the_weights():
    # d/dl_i [lam * log mean exp(l/lam)] = softmax(l/lam)_i: a second route to the weights
    losses = torch.tensor([0.3, 2.0, 1.1, 0.0], requires_grad=True)
    dro_objective(losses, 0.7).backward()
    assert torch.allclose(losses.grad, dro_weights(losses.detach(), 0.7), atol=1e-6)


def test_log_mean_exp_large_and_empty():
    assert float(log_mean_exp(torch.tensor([1000.0, 1000.0 + math.log(3.0)]))) == pytest.approx(1000.0 + math.log(2.0))
    assert float(log_mean_exp(torch.tensor([]))) == -math.inf


def test_dro_weights_refuse_losses_that_are_not_per_sample():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        dro_weights(torch.zeros(1, 4), lam=1.0)  # softmax over dim 0 would give ones, summing to 4
