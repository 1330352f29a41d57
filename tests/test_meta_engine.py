"""The meta-gradient engine against independent references (per-sample gradient loops, textbook MW-Net)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_reweight.functional import l2rw_weights
from lightning_reweight.meta import MetaProblem, MetaWeightNet, capture_rng
from lightning_reweight.meta.engine import HYPERGRADS


def small_cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).train()


def data(b: int = 10, m: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 1, 8, 8, generator=g), torch.randint(0, 3, (b,), generator=g),
            torch.randn(m, 1, 8, 8, generator=g), torch.randint(0, 3, (m,), generator=g))


def reference_alignment(model: nn.Module, x, y, mx, my, rng=None) -> torch.Tensor:
    """u_i = <grad l_i, grad L_meta>, per-sample gradients one by one (a deep copy: the model is not touched)."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    if rng is not None:
        torch.set_rng_state(rng)
    g = torch.autograd.grad(F.cross_entropy(m(mx), my), params)
    if rng is not None:
        torch.set_rng_state(rng)
    losses = F.cross_entropy(m(x), y, reduction="none")
    rows = []
    for i in range(len(y)):
        gi = torch.autograd.grad(losses[i], params, retain_graph=True)
        rows.append(sum((a.double() * b.double()).sum() for a, b in zip(gi, g)))
    return torch.stack(rows)


def problem(model: nn.Module, hypergrad: str, x, y, mx, my, **kw) -> MetaProblem:
    def ce(b):
        return F.cross_entropy(model(b[0]), b[1], reduction="none")

    return MetaProblem(model, ce, lambda b: ce(b).mean(), (x, y), (mx, my), hypergrad=hypergrad, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_alignment_matches_per_sample_gradient_loop_with_batchnorm():
    model = small_cnn()
    x, y, mx, my = data()
    ref = reference_alignment(model, x, y, mx, my)
    assert rel(problem(model, "forward", x, y, mx, my).alignment(), ref) < 1e-5
    assert rel(problem(model, "second_order", x, y, mx, my).alignment(), ref) < 1e-5
    fd = problem(model, "finite_diff", x, y, mx, my).alignment()
    assert F.cosine_similarity(fd.double(), ref, dim=0) > 0.999
    assert rel(fd, ref) < 0.05  # the scale too (MW-Net's meta gradient is not normalised away)


def test_l2rw_weights_forward_equals_second_order_and_fd_close():
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    exact = l2rw_weights(model, x, y, mx, my, hypergrad="second_order", lr=0.1)
    fwd = l2rw_weights(model, x, y, mx, my, hypergrad="forward")
    fd = l2rw_weights(model, x, y, mx, my, hypergrad="finite_diff")
    assert exact.sum() > 0 and (exact >= 0).all()
    assert torch.isclose(exact.sum(), torch.tensor(1.0))
    assert rel(fwd, exact) < 1e-5
    assert F.cosine_similarity(fd, exact, dim=0) > 0.999
    # the weights are the clipped, normalised reference alignment
    u = reference_alignment(model, x, y, mx, my).clamp_min(0)
    assert rel(exact, (u / u.sum()).float()) < 1e-5


def test_l2rw_weights_all_zero_when_nothing_aligns():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0]])
    # training label 1 pushes the opposite way to the meta label 0 for the same input
    w = l2rw_weights(model, x, torch.tensor([1]), x, torch.tensor([0]), hypergrad="forward")
    assert torch.equal(w, torch.zeros(1))


@pytest.mark.parametrize("hypergrad", ["forward", "finite_diff", "second_order"])
def test_model_buffers_rng_and_optimizer_untouched(hypergrad):
    model = small_cnn(dropout=0.3)
    x, y, mx, my = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    mwn = MetaWeightNet(hidden=4)  # (its initialisation draws from the RNG)
    rng = torch.get_rng_state()
    l2rw_weights(model, x, y, mx, my, hypergrad=hypergrad)
    mwn.meta_weights(problem(model, hypergrad, x, y, mx, my), lr=0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    after = opt.state_dict()
    for k, s in opt_state["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], s["momentum_buffer"])


def test_dropout_masks_replayed_from_saved_state():
    model = small_cnn(dropout=0.5)
    x, y, mx, my = data()
    rng = capture_rng()
    ref = reference_alignment(model, x, y, mx, my, rng=rng[0])
    # the training forward's losses (same mask) are reused by finite_diff
    torch.set_rng_state(rng[0])
    losses = F.cross_entropy(model(x), y, reduction="none").detach()
    torch.manual_seed(123)  # the engine must replay the saved state, not use the current one
    for hypergrad in ("forward", "second_order"):
        assert rel(problem(model, hypergrad, x, y, mx, my, rng_state=rng).alignment(), ref) < 1e-5
    fd = problem(model, "finite_diff", x, y, mx, my, rng_state=rng, losses=losses).alignment()
    assert F.cosine_similarity(fd.double(), ref, dim=0) > 0.999
    assert rel(fd, ref) < 0.05


@pytest.mark.parametrize("hypergrad", HYPERGRADS)
def test_prepared_before_the_training_forward_equals_the_reference(hypergrad):
    """``prepare()`` before the training forward (as MetaReweight does for L2RW), then ``attach_losses`` with that
    forward's losses: the per-sample-gradient reference, the same dropout masks, and nothing consumed from the RNG."""
    model = small_cnn(dropout=0.5)
    before = copy.deepcopy(model.state_dict())
    x, y, mx, my = data()
    rng = capture_rng()
    ref = reference_alignment(model, x, y, mx, my, rng=rng[0])
    torch.set_rng_state(rng[0])
    early = problem(model, hypergrad, x, y, mx, my, rng_state=rng)
    early.prepare()
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics untouched
        assert torch.equal(v, before[k])
    losses = F.cross_entropy(model(x), y, reduction="none")  # draws its masks from the restored stream
    early.attach_losses(losses)
    got = early.alignment()
    if hypergrad == "finite_diff":
        assert F.cosine_similarity(got.double(), ref, dim=0) > 0.999
        assert rel(got, ref) < 0.05
    else:
        assert rel(got, ref) < 1e-5


def test_prepared_finite_difference_does_not_reuse_autocast_losses():
    """Made outside autocast, handed losses computed under bf16 autocast: the engine recomputes l(theta) in fp32."""
    model = small_cnn()
    x, y, mx, my = data()
    ref = problem(model, "finite_diff", x, y, mx, my).alignment()
    early = problem(model, "finite_diff", x, y, mx, my)
    early.prepare()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = F.cross_entropy(model(x), y, reduction="none")
        early.attach_losses(losses)
    assert not torch.allclose(losses.detach().float(), F.cross_entropy(model(x), y, reduction="none"), rtol=1e-4)
    torch.testing.assert_close(early.alignment(), ref, rtol=1e-5, atol=1e-6)


def textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr, scale=None, normalize=False):
    """Meta-Weight-Net's meta gradient written out: virtual step (each parameter's lr ``lr * scale``), meta loss,
    backward to phi. ``normalize``: the virtual step's loss is ``sum_i V_i l_i / sum_j V_j`` (the official
    WRN-28-10 / class-imbalance scripts) instead of ``sum_i V_i l_i / B``."""
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    params = list(m.parameters())
    bufs = {n: b.clone() for n, b in m.named_buffers()}
    losses = F.cross_entropy(m(x), y, reduction="none")
    v = mwn.weight_net(losses.detach())
    total = v.sum() if normalize else len(y)
    grads = torch.autograd.grad((v * losses).sum() / total, params, create_graph=True)
    scale = [1.0] * len(params) if scale is None else scale
    virtual = {n: p - lr * r * g for n, p, g, r in zip(names, params, grads, scale)}
    meta = F.cross_entropy(functional_call(m, {**virtual, **bufs}, (mx,)), my)
    return torch.autograd.grad(meta, list(mwn.weight_net.parameters()))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in ts])


def test_mwnet_meta_gradient_routes_match_textbook():
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    torch.manual_seed(3)
    mwn = MetaWeightNet(hidden=16)
    lr = 0.5
    ref = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr))
    second = flat(mwn.meta_gradient(problem(model, "second_order", x, y, mx, my), lr))
    fwd = flat(mwn.meta_gradient(problem(model, "forward", x, y, mx, my), lr))
    fd = flat(mwn.meta_gradient(problem(model, "finite_diff", x, y, mx, my), lr))
    assert rel(second, ref) < 1e-5
    assert rel(fwd, ref) < 1e-5  # exact: G_i is evaluated at the virtual-step parameters theta'
    assert F.cosine_similarity(fd, ref, dim=0) > 0.999
    assert rel(fd, ref) < 0.05  # first order in h: direction and length


def test_mwnet_meta_gradient_from_a_given_step_gradient_matches_textbook():
    """The delayed route hands the real backward's gradient of mean_i V(l_i) l_i to the meta step, which takes the
    virtual step from it instead of differentiating it: same textbook meta gradient (exact on the forward route)."""
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    torch.manual_seed(3)
    mwn = MetaWeightNet(hidden=16, delayed=True)
    lr = 0.5
    ref = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr))
    m = copy.deepcopy(model)  # the real step's gradient, computed apart (BatchNorm in train mode: same batch stats)
    losses = F.cross_entropy(m(x), y, reduction="none")
    step = torch.autograd.grad((mwn.weight_net(losses.detach()) * losses).mean(), list(m.parameters()))
    fwd = flat(mwn.meta_gradient(problem(model, "forward", x, y, mx, my), lr, step_gradient=step))
    fd = flat(mwn.meta_gradient(problem(model, "finite_diff", x, y, mx, my), lr, step_gradient=step))
    assert rel(fwd, ref) < 1e-5
    assert F.cosine_similarity(fd, ref, dim=0) > 0.999
    zero = flat(mwn.meta_gradient(problem(model, "forward", x, y, mx, my), lr, step_gradient=[0 * g for g in step]))
    assert rel(zero, ref) > 1e-3  # the given gradient is what places theta'


def test_mwnet_virtual_step_reuses_training_graph():
    model = small_cnn()
    x, y, mx, my = data()
    mwn = MetaWeightNet(hidden=8)
    losses = F.cross_entropy(model(x), y, reduction="none")
    reused = flat(mwn.meta_gradient(problem(model, "forward", x, y, mx, my, losses=losses, reuse_graph=True), 0.3))
    ref = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, 0.3))
    assert rel(reused, ref) < 1e-5


def test_invalid_hypergrad():
    model = small_cnn()
    x, y, mx, my = data()
    with pytest.raises(ValueError, match="hypergrad"):
        l2rw_weights(model, x, y, mx, my, hypergrad="newton")


def test_mwnet_normalized_weights_are_mean_scaled_meta_net_outputs():
    mwn = MetaWeightNet(hidden=8, normalize=True)
    losses = torch.tensor([0.1, 0.5, 2.0, 4.0])
    v = mwn.weight_net(losses).detach()
    w = mwn.weights(losses)
    assert torch.allclose(w, 4 * v / v.sum())
    raw = MetaWeightNet(hidden=8)  # unnormalised (the official ResNet-32 script): the meta-net's outputs as they are
    assert torch.allclose(raw.weights(losses), raw.weight_net(losses).detach())


def test_mwnet_first_order_variant_is_the_small_step_limit_of_the_textbook_gradient():
    """``lookahead=False`` takes G_i at theta: the textbook meta gradient's limit as the virtual step shrinks (here
    at lr 1e-6, rescaled: the gap is linear in that lr, 48 times it here), on every route; at the real lr it
    differs from the lookahead gradient."""
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    torch.manual_seed(3)
    mwn = MetaWeightNet(hidden=16, lookahead=False)
    lr, tiny = 0.5, 1e-6
    limit = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, tiny)) * (lr / tiny)
    routes = {hg: flat(mwn.meta_gradient(problem(model, hg, x, y, mx, my), lr)) for hg in HYPERGRADS}
    assert rel(routes["second_order"], limit) < 1e-3
    assert rel(routes["forward"], limit) < 1e-3
    # the fd alignments are within 0.2% here, but the meta gradient sums them against dV/dphi with cancellation:
    # observed 5.5% / cosine 0.9985 at the default fd_eps (0.3% at fd_eps=1e-4)
    assert rel(routes["finite_diff"], limit) < 0.1
    assert F.cosine_similarity(routes["finite_diff"], limit, dim=0) > 0.995
    lookahead = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr))
    assert rel(routes["forward"], lookahead) > 1e-3


# ------------------------------------------------------------------------------------------ edge cases (review)
def test_l2rw_normalisation_is_scale_invariant_and_keeps_float64():
    from lightning_reweight.meta.l2rw import l2rw_from_alignment

    # a subnormal total (1e-39 is below float32's smallest normal number) still normalises: max(u, 0) / sum
    w = l2rw_from_alignment(torch.tensor([1e-39, 1e-39, -1.0]))
    assert w.tolist() == pytest.approx([0.5, 0.5, 0.0])
    u = torch.tensor([3e-50, 1e-50, -2e-50], dtype=torch.float64)  # zero in float32, not in float64
    w = l2rw_from_alignment(u)
    assert w.dtype == torch.float64 and w.tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert l2rw_from_alignment(torch.tensor([-1.0, 0.0])).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("hypergrad", ["forward", "second_order"])
def test_float64_model_keeps_float64_precision(hypergrad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y, mx, my = data()
    x, mx = x.double(), mx.double()
    got = problem(model, hypergrad, x, y, mx, my).alignment()
    ref = reference_alignment(model, x, y, mx, my)  # float64 per-sample gradients
    assert got.dtype == torch.float64
    assert rel(got, ref) < 1e-12  # float32 arithmetic would stop at ~1e-7


def test_l2rw_weights_refuses_reduced_losses_and_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y, mx, my = data()
    with pytest.raises(ValueError, match="per-sample losses of shape"):
        l2rw_weights(model, x, y, mx, my, loss_fn=F.cross_entropy)  # reduction="mean": a scalar
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        l2rw_weights(model, x, y, mx, my)


def test_l2rw_weights_empty_meta_batch_is_an_error_and_nan_is_not_all_zero():
    """An empty meta batch or a nan input used to give all-zero weights, which reads as "no sample aligns"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y, mx, my = data()
    with pytest.raises(ValueError, match="non-empty training and meta batch"):
        l2rw_weights(model, x, y, mx[:0], my[:0])
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    assert l2rw_weights(model, bad, y, mx, my).isnan().all()


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_forward_route_names_the_alternatives_for_layers_without_forward_ad():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return _NoForwardAD.apply(self.fc(x.flatten(1)))

    model = Net()
    x, y, mx, my = data()
    with pytest.raises(NotImplementedError, match='use hypergrad="finite_diff"'):
        l2rw_weights(model, x, y, mx, my, hypergrad="forward")
    w = l2rw_weights(model, x, y, mx, my, hypergrad="finite_diff")
    assert float(w.sum()) == pytest.approx(1.0)


def test_finite_diff_on_a_barely_touched_embedding_table():
    """An embedding table of 50k rows, 8 of them in the batch: the full parameter norm makes the default step far
    too large (a warning says so); fd_scale="moved" scales it by the moved entries and matches the exact route."""
    import warnings

    import lightning_reweight.meta.engine as engine

    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50_000, 16)
            self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, tokens):
            return self.head(self.emb(tokens).mean(1))

    model = Bag()
    g = torch.Generator().manual_seed(2)
    x, mx = torch.randint(0, 50_000, (8, 4), generator=g), torch.randint(0, 50_000, (6, 4), generator=g)
    y, my = torch.randint(0, 3, (8,), generator=g), torch.randint(0, 3, (6,), generator=g)
    exact = problem(model, "forward", x, y, mx, my).alignment()
    with warnings.catch_warnings():  # a dense model first: the check is per model, the embedding model still warns
        warnings.simplefilter("error")
        problem(small_cnn(), "finite_diff", *data()).alignment()
    with pytest.warns(UserWarning, match='fd_scale="moved"'):
        coarse = problem(model, "finite_diff", x, y, mx, my).alignment()
    moved = problem(model, "finite_diff", x, y, mx, my, fd_scale="moved").alignment()
    cos = lambda a, b: float(F.cosine_similarity(a.double(), b.double(), dim=0))  # noqa: E731
    assert cos(moved, exact) > 0.9999 and rel(moved, exact) < 0.02
    assert rel(coarse, exact) > 5 * rel(moved, exact)  # what the warning is about
    assert model in engine._MOVED_SHARE_CHECKED  # and warned once per model
    with pytest.raises(ValueError, match="fd_scale"):
        problem(model, "finite_diff", x, y, mx, my, fd_scale="some")


def test_per_parameter_learning_rates_reach_the_virtual_step_and_the_alignment():
    """Two parameter groups (lr ratio 20 for the head, 0 for a frozen-by-optimizer layer): L2RW's u_i is
    sum_k r_k <grad_k l_i, grad_k L_meta> and MW-Net's virtual step moves each parameter with its own lr."""
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    n = len(list(model.parameters()))
    scale = [0.0 if k == 0 else (20.0 if k >= n - 2 else 1.0) for k in range(n)]
    # L2RW: the per-sample gradient loop, each parameter's term scaled
    m = copy.deepcopy(model)
    params = list(m.parameters())
    g_meta = torch.autograd.grad(F.cross_entropy(m(mx), my), params)
    losses = F.cross_entropy(m(x), y, reduction="none")
    ref = torch.stack([
        sum(r * (a.double() * b.double()).sum()
            for a, b, r in zip(torch.autograd.grad(losses[i], params, retain_graph=True), g_meta, scale))
        for i in range(len(y))
    ])
    plain = reference_alignment(model, x, y, mx, my)
    assert rel(plain, ref) > 0.1  # the scaling matters for this check
    for hypergrad in ("forward", "second_order"):
        assert rel(problem(model, hypergrad, x, y, mx, my, lr_scale=scale).alignment(), ref) < 1e-5
    fd = problem(model, "finite_diff", x, y, mx, my, lr_scale=scale).alignment()
    assert F.cosine_similarity(fd.double(), ref, dim=0) > 0.999
    # MW-Net
    torch.manual_seed(3)
    mwn = MetaWeightNet(hidden=16)
    lr = 0.05
    textbook = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr, scale))
    assert rel(flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr)), textbook) > 0.05
    for hypergrad in ("forward", "second_order"):
        got = flat(mwn.meta_gradient(problem(model, hypergrad, x, y, mx, my, lr_scale=scale), lr))
        assert rel(got, textbook) < 1e-5
    # the delayed route (virtual step from the real backward's gradient) moves each parameter with its own lr too
    torch.manual_seed(3)
    delayed = MetaWeightNet(hidden=16, delayed=True)
    m = copy.deepcopy(model)
    losses = F.cross_entropy(m(x), y, reduction="none")
    step = torch.autograd.grad((delayed.weight_net(losses.detach()) * losses).mean(), list(m.parameters()))
    for hypergrad in ("forward", "finite_diff"):
        got = flat(delayed.meta_gradient(problem(model, hypergrad, x, y, mx, my, lr_scale=scale), lr,
                                         step_gradient=step))
        assert rel(got, textbook) < (1e-5 if hypergrad == "forward" else 0.05), hypergrad
    with pytest.raises(ValueError, match="lr_scale"):
        problem(model, "forward", x, y, mx, my, lr_scale=[1.0])


def test_normalised_mwnet_meta_gradient_matches_textbook():
    """normalize=True takes its virtual step with V_i / sum_j V_j (the official normalised scripts), not V_i / B:
    only the weights were checked before."""
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    torch.manual_seed(3)
    mwn = MetaWeightNet(hidden=16, normalize=True)
    lr = 0.5
    ref = flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr, normalize=True))
    assert rel(flat(textbook_mwnet_gradient(model, mwn, x, y, mx, my, lr)), ref) > 0.05  # the two differ here
    for hypergrad in ("second_order", "forward", "finite_diff"):
        got = flat(mwn.meta_gradient(problem(model, hypergrad, x, y, mx, my), lr))
        assert rel(got, ref) < (0.05 if hypergrad == "finite_diff" else 1e-5), hypergrad


@pytest.mark.parametrize("hypergrad", ["second_order", "forward", "finite_diff"])
def test_alignment_at_lr_is_lr_times_the_alignment(hypergrad):
    """``-dL_meta/d eps_i`` at ``eps = 0`` of a virtual step of size lr is exactly lr * u_i (theta' = theta there)."""
    model = small_cnn()
    x, y, mx, my = data(16, 12)
    ref = reference_alignment(model, x, y, mx, my)
    lr = 0.3
    got = problem(model, hypergrad, x, y, mx, my).alignment_at_lr(lr)
    assert rel(got, lr * ref) < (0.05 if hypergrad == "finite_diff" else 1e-5)


# ---------------------------------------------------------------------------- models users bring (engine review)
def _param_ids(model):
    return [id(p) for p in model.parameters()]


@pytest.mark.parametrize("hypergrad", HYPERGRADS)
def test_a_module_registered_under_two_names_keeps_its_parameters(hypergrad):
    """nn.Sequential(lin, bn, tanh, lin, bn, ...): PyTorch's functional_call swapped the shared module twice and
    put a detached copy back in place of its parameters (training of that layer stopped, later calls were
    wrong, the shared BatchNorm's statistics changed). Two calls in a row stay exact and leave the model as it was."""
    torch.manual_seed(0)
    lin, bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), lin, bn, nn.Tanh(), lin, bn, nn.Tanh(), nn.Linear(8, 3))
    ids, state = _param_ids(model), copy.deepcopy(model.state_dict())
    x, y, mx, my = data()
    ref = reference_alignment(model, x, y, mx, my)
    for _ in range(2):
        got = problem(model, hypergrad, x, y, mx, my).alignment()
        if hypergrad == "finite_diff":
            assert float(F.cosine_similarity(got.double(), ref.double(), dim=0)) > 0.999
        else:
            assert rel(got, ref) < 1e-5
        assert _param_ids(model) == ids and all(type(p) is nn.Parameter for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("hypergrad", HYPERGRADS)
def test_an_embedding_with_max_norm_is_not_renormalised_by_the_meta_step(hypergrad):
    """Embedding(max_norm=...) renormalises the rows it looks up in place: the extra forwards used to do that to
    the model's own table (rows of the meta batch too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, max_norm=1.0), nn.Flatten(), nn.Linear(18, 3))
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # every row above max_norm
    before = model[0].weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    x, mx = torch.randint(0, 20, (6, 3), generator=g), torch.randint(0, 20, (5, 3), generator=g)
    y, my = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (5,), generator=g)
    problem(model, hypergrad, x, y, mx, my).alignment()
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("hypergrad", ["forward", "second_order"])
def test_attention_layers_on_the_exact_routes(hypergrad):
    """scaled_dot_product_attention's default CPU kernel has neither forward-mode AD nor double backward: the
    exact routes run attention with the math kernel and match the per-sample loop."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(x.view(x.shape[0], 8, 8)).mean(1))

    model = Encoder().train()  # (in eval mode PyTorch takes a fused fast path without forward-mode AD)
    x, y, mx, my = data()
    got = problem(model, hypergrad, x, y, mx, my).alignment()
    assert rel(got, reference_alignment(model, x, y, mx, my)) < 1e-5


def test_the_finite_difference_norm_is_the_float64_norm_of_all_tensors():
    """_norm reads all squared sums in one host sync (it synced twice per tensor); the value is unchanged."""
    import math

    from lightning_reweight.meta.engine import _norm

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g) * 1e3, torch.zeros(2)]
    expected = math.sqrt(math.fsum(float(v) ** 2 for t in tensors for v in t.double().flatten()))
    assert _norm(tensors) == pytest.approx(expected, rel=1e-14) and _norm([]) == 0.0


def test_finite_difference_forwards_run_without_tf32(monkeypatch):
    """TF32 (cuDNN's default for CUDA convolutions, matmuls under set_float32_matmul_precision("high")) rounds to
    10 mantissa bits, coarser than the perturbation: with TF32 on, the finite difference's forwards and its
    l(theta) run with TF32 off, and the training forward's (TF32) losses are not reused. Emulated on CPU: the
    flags are plain settings here, and the engine is told that the device would use them."""
    import lightning_reweight.meta.engine as engine

    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return self.net(x)

    model = Spy()
    x, y, mx, my = data()
    ref = reference_alignment(model, x, y, mx, my)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(engine, "_tf32_enabled", lambda device_type: True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        wrong = F.cross_entropy(model(x), y, reduction="none") + 1.0  # what a TF32 forward's rounding would be
        seen.clear()
        fd = problem(model, "finite_diff", x, y, mx, my, losses=wrong).alignment()
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert (False, False) in seen  # the shifted forward and l(theta)
    assert rel(fd, ref) < 0.05  # l(theta) recomputed, not the training forward's


def test_second_order_alignment_of_losses_no_parameter_moves_is_zero():
    """With training losses that no parameter moves (a constant, or a frozen network), the double backward summed
    no gradient term into the int 0 and crashed (``'int' object is not iterable``); the other routes gave zeros."""
    net = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))

    def constant(b):
        return torch.ones(b[0].shape[0])

    def meta(b):
        return nn.functional.cross_entropy(net(b[0]), b[1])

    direction = [torch.ones_like(p) for p in net.parameters()]
    for hypergrad in ("second_order", "forward", "finite_diff"):
        u = MetaProblem(net, constant, meta, batch, batch, hypergrad=hypergrad).directional(direction)
        assert u.shape == (4,) and not u.any(), hypergrad


# ---------------------------------------------------------------------------- from the fourth mutation audit
@pytest.mark.parametrize("compile_how", ["torch_compile", "in_place"])
def test_the_engine_refuses_second_order_for_a_compiled_model_when_built(compile_how):
    """A double backward through torch.compile'd code is not supported: a MetaProblem over a model with a compiled
    part (torch.compile(...) or module.compile()) refuses second_order when it is built, naming the remedy, while
    the other routes are accepted. Nothing is compiled here: no forward runs."""
    model = small_cnn()
    if compile_how == "torch_compile":
        model[0] = torch.compile(model[0], backend="aot_eager")
    else:
        model[-1].compile(backend="aot_eager")
    x, y, mx, my = data()
    with pytest.raises(ValueError, match="second_order.*torch.compile.*finite_diff"):
        problem(model, "second_order", x, y, mx, my)
    for hypergrad in ("finite_diff", "forward"):
        problem(model, hypergrad, x, y, mx, my)


def test_the_meta_routes_mark_their_forwards_and_unmark_them_when_one_raises():
    """The engine's forwards run inside extra_forwards (a hook looking for the training step's forward skips them);
    a forward that raises must not leave the mark set, or every later training forward in the process would be
    taken for one of the library's (the monitor's subset accuracy would count nothing)."""
    from lightning_reweight._forwards import in_extra_forward

    model = small_cnn()
    x, y, mx, my = data()
    marked = []

    def failing(batch):
        marked.append(in_extra_forward())
        raise RuntimeError("a layer failed")

    assert not in_extra_forward()
    with pytest.raises(RuntimeError, match="a layer failed"):
        MetaProblem(model, failing, lambda b: failing(b).mean(), (x, y), (mx, my), hypergrad="forward").alignment()
    assert marked == [True]
    assert not in_extra_forward()
