import copy
import math
import os
import random
import re

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from two_optimizers import TwoOptimizers

from lightning_reweight.callbacks import MetaReweight, SusceptibilityMonitor
from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.data import DigitsDataModule
from lightning_reweight.functional import susceptibility_losses, susceptibility_step
from lightning_reweight.meta import L2RW
from lightning_reweight.metrics import select_models, susceptibility_from_checkpoint
from lightning_reweight.models import MLP

os.environ.setdefault("WANDB_MODE", "disabled")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _net(seed=0, dropout=0.0, batch_norm=True):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4)
    ) if batch_norm else nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4))


def _warm_up(net, opt, steps=3):
    """A few real steps so that the optimizer has momentum buffers and BN has non-trivial running stats."""
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        x, y = torch.randn(10, 6, generator=g), torch.randint(4, (10,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def _reference_sgd_drop(net, opt, x, y):
    """Independent route: SGD with momentum, dampening 0, coupled weight decay, written out by hand."""
    before, after = _reference_sgd_losses(net, opt, x, y)
    return before - after


def _reference_sgd_losses(net, opt, x, y):
    """The random-label loss before and after the hand-written SGD step (see ``_reference_sgd_drop``).

    Both forwards start from the RNG state at the call (the same dropout masks); the RNG is left after the second.
    """
    group = opt.param_groups[0]
    lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    rng = torch.get_rng_state()
    loss_before = nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss_before, params)
    with torch.no_grad():
        for p_ref, p_orig, g in zip(params, net.parameters(), grads):
            d = g + wd * p_ref
            buf = opt.state[p_orig].get("momentum_buffer")
            buf = d.clone() if buf is None else mom * buf + d
            p_ref.sub_(lr * buf)
        torch.set_rng_state(rng)
        loss_after = nn.functional.cross_entropy(ref(x), y)
    return float(loss_before.detach()), float(loss_after)


def _snapshot(net, opt):
    return (
        [p.detach().clone() for p in net.parameters()],
        [b.detach().clone() for b in net.buffers()],
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()},
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


def _assert_same(a, b):
    params_a, bufs_a, grads_a, state_a, groups_a = a
    params_b, bufs_b, grads_b, state_b, groups_b = b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert len(bufs_a) == len(bufs_b) and all(torch.equal(x, y) for x, y in zip(bufs_a, bufs_b))
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert state_a[k].keys() == state_b[k].keys()
        for key in state_a[k]:
            va, vb = state_a[k][key], state_b[k][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb
    assert groups_a == groups_b


# ---------------------------------------------------------------------------------------------------------------
# susceptibility_step


@pytest.mark.parametrize("warm", [False, True])
def test_step_matches_hand_written_sgd_momentum(warm):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if warm:
        _warm_up(net, opt)
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 6, generator=g), torch.randint(4, (32,), generator=g)
    expected = _reference_sgd_drop(net, opt, x, y)
    drop = susceptibility_step(net, opt, x, y)
    assert drop.dtype == torch.float32 and drop.dim() == 0
    assert float(drop) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected != 0.0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_losses_match_hand_written_sgd_and_give_the_drop(dropout):
    """With dropout, both forwards of the probe draw the masks the reference draws from the same RNG state."""
    net = _net(dropout=dropout)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    _warm_up(net, opt)
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(32, 6, generator=g), torch.randint(4, (32,), generator=g)
    rng = torch.get_rng_state()
    expected_before, expected_after = _reference_sgd_losses(net, opt, x, y)
    torch.set_rng_state(rng)
    before, after = susceptibility_losses(net, opt, x, y)
    assert float(before) == pytest.approx(expected_before, rel=1e-5)
    assert float(after) == pytest.approx(expected_after, rel=1e-5)
    assert float(susceptibility_step(net, opt, x, y)) == float(before - after)


def test_step_leaves_every_piece_of_state_unchanged():
    net = _net(dropout=0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    _warm_up(net, opt)
    # stale accumulated gradients that the user loop might still be using
    x0, y0 = torch.randn(10, 6), torch.randint(4, (10,))
    nn.functional.cross_entropy(net(x0), y0).backward()
    x, y = torch.randn(20, 6), torch.randint(4, (20,))

    before = _snapshot(net, opt)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    expected_torch, expected_py, expected_np = torch.rand(5), random.random(), np.random.rand()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    drop = susceptibility_step(net, opt, x, y)
    assert torch.isfinite(drop)
    assert torch.equal(torch.rand(5), expected_torch)
    assert random.random() == expected_py
    assert np.random.rand() == expected_np
    _assert_same(before, _snapshot(net, opt))


def test_step_restores_adam_state_and_step_counters():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    _warm_up(net, opt, steps=2)
    before = _snapshot(net, opt)
    steps_before = [float(s["step"]) for s in opt.state.values()]
    susceptibility_step(net, opt, torch.randn(16, 6), torch.randint(4, (16,)))
    _assert_same(before, _snapshot(net, opt))
    assert [float(s["step"]) for s in opt.state.values()] == steps_before == [2.0] * len(steps_before)


def test_step_creates_no_optimizer_state_on_fresh_optimizer():
    net = _net(batch_norm=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    before = _snapshot(net, opt)
    susceptibility_step(net, opt, torch.randn(8, 6), torch.randint(4, (8,)))
    assert len(opt.state) == 0
    _assert_same(before, _snapshot(net, opt))


class _SubclassedSGD(torch.optim.SGD):
    """Same maths as SGD, but a subclass: susceptibility_step takes its generic route (``optimizer.step()``)."""


def _two_group_net_and_optimizers(**sgd_kwargs):
    net = _net(dropout=0.2)
    frozen = nn.Parameter(torch.randn(3), requires_grad=False)  # in the optimizer, never stepped
    unused = nn.Parameter(torch.randn(3))  # in the optimizer, no gradient from the loss
    head = list(net[-1].parameters())
    body = [p for p in net.parameters() if all(p is not q for q in head)]

    def groups():
        return [{"params": body + [frozen, unused]}, {"params": head, "lr": 0.02}]

    return net, torch.optim.SGD(groups(), lr=0.1, **sgd_kwargs), _SubclassedSGD(groups(), lr=0.1, **sgd_kwargs)


@pytest.mark.parametrize(
    "sgd_kwargs",
    [
        {},
        {"momentum": 0.9, "weight_decay": 5e-4},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"momentum": 0.8, "dampening": 0.3},
        {"momentum": 0.9, "maximize": True},
    ],
    ids=["plain", "momentum-wd", "nesterov", "dampening", "maximize"],
)
@pytest.mark.parametrize("warm", ["fresh", "warm", "partial"])
def test_sgd_route_equals_optimizer_step_route(sgd_kwargs, warm):
    """For torch.optim.SGD the probe steps the parameters itself (the optimizer's own rule, without running
    ``optimizer.step()``); a subclass goes through ``optimizer.step()``. Both give the same drop, leave the same
    (unchanged) state, and the same training continues afterwards. ``partial``: one parameter has no momentum
    buffer yet while the others do (SGD starts it from the gradient; with dampening that differs from a zero
    buffer)."""
    net, sgd, generic = _two_group_net_and_optimizers(**sgd_kwargs)
    if warm != "fresh":
        _warm_up(net, sgd)
        if warm == "partial":
            sgd.state.pop(net[-1].bias, None)  # as if the head's bias had had no gradient so far
        generic.load_state_dict(sgd.state_dict())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 6, generator=g), torch.randint(4, (24,), generator=g)
    before = _snapshot(net, sgd)
    torch.manual_seed(5)
    fast = susceptibility_step(net, sgd, x, y)
    _assert_same(before, _snapshot(net, sgd))
    generic_before = _snapshot(net, generic)
    torch.manual_seed(5)
    slow = susceptibility_step(net, generic, x, y)
    _assert_same(before, _snapshot(net, sgd))
    _assert_same(generic_before, _snapshot(net, generic))  # the generic route's optimizer is untouched too
    assert float(slow) != 0.0
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01),
    lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True),
    lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9),
])
def test_a_fresh_optimizer_has_no_state_after_the_probe(make):
    """The monitor's first probe runs before the first training step: an optimizer that creates its state in its
    first step (Adam's moments and step counter) must not start training with the probe's."""
    net = _net()
    opt = make(net.parameters())
    twin = copy.deepcopy(net)
    twin_opt = make(twin.parameters())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 6, generator=g), torch.randint(4, (24,), generator=g)
    drop = susceptibility_step(net, opt, x, y)
    assert len(opt.state) == 0 and float(drop) != 0.0
    for model, o in ((net, opt), (twin, twin_opt)):  # the first real step is the one the unprobed twin takes
        o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin.parameters()))


def test_sgd_with_step_hooks_is_stepped_for_real():
    """A pre-hook that shrinks the gradients (clipping) is part of the training optimizer's step: SGD with hooks
    takes the ``optimizer.step()`` route, like every other optimizer (the SGD fast route ignored its hooks)."""
    net = _net(batch_norm=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    _warm_up(net, opt)
    calls = []

    def shrink(optimizer, args, kwargs):
        calls.append(1)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad.mul_(1e-3)

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(24, 6, generator=g), torch.randint(4, (24,), generator=g)
    plain = susceptibility_step(net, opt, x, y)
    opt.register_step_pre_hook(shrink)
    ref_net, ref_opt = copy.deepcopy((net, opt))  # a real step of the same optimizer, hook included
    ref_opt.register_step_pre_hook(shrink)  # (deepcopy leaves hooks behind)
    ce = nn.functional.cross_entropy
    before = ce(ref_net(x), y)
    ref_opt.zero_grad()
    before.backward()
    ref_opt.step()
    with torch.no_grad():
        expected = float(before) - float(ce(ref_net(x), y))
    calls.clear()
    drop = susceptibility_step(net, opt, x, y)
    assert calls == [1]  # the hook ran once, in the probe's step
    assert float(drop) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert abs(float(drop)) < 0.5 * abs(float(plain))  # ... and it changed the step (momentum keeps a part)


def test_step_rejects_mismatched_targets():
    net = _net(batch_norm=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="random_targets"):
        susceptibility_step(net, opt, torch.randn(8, 6), torch.randint(4, (7,)))


# ---------------------------------------------------------------------------------------------------------------
# the callback


class _NoisyDM(L.LightningDataModule):
    """Synthetic 4-class data with a known noise mask; batches are (x, noisy_y, idx)."""

    def __init__(self, n=96, noise=0.5, batch_size=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = 4
        clean = torch.randint(4, (n,), generator=g)
        x = torch.randn(n, 6, generator=g) + 2.0 * nn.functional.one_hot(clean, 6).float()
        self.noise_mask = torch.rand(n, generator=g) < noise
        noisy = torch.where(self.noise_mask, (clean + 1 + torch.randint(3, (n,), generator=g)) % 4, clean)
        self.train_targets = noisy
        self.train_dataset = TensorDataset(x, noisy, torch.arange(n))
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)


def _module(seed=0):
    torch.manual_seed(seed)
    return ReweightClassifier(MLP(6, 4, hidden=(32,), dropout=0.2, batch_norm=True), num_classes=4, lr=0.1)


class _Recording(ReweightClassifier):
    """Records, per epoch, the predictions of the first forward of every training_step (a second route)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: dict[int, list] = {}
        self._capture = False

    def training_step(self, batch, batch_idx):
        self._capture = True
        loss = super().training_step(batch, batch_idx)
        _, y, idx = batch
        self.records.setdefault(self.current_epoch, []).append((self._pred, y.clone(), idx.clone()))
        return loss

    def forward(self, x):
        out = super().forward(x)
        if self._capture:
            self._pred, self._capture = out.argmax(1).detach().clone(), False
        return out


def _recorded_subset_accuracy(records, noise_mask):
    """(noisy accuracy, clean accuracy, samples seen) of recorded (pred, y, idx) triples."""
    pred, y, idx = (torch.cat(t) for t in zip(*records))
    correct, noisy = pred == y, noise_mask[idx]
    return correct[noisy].float().mean().item(), correct[~noisy].float().mean().item(), len(y)


class _CountSpy(SusceptibilityMonitor):
    """Keeps each epoch's number of counted training predictions before they are published."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if self._train_counts is not None:
            self._fold()
            self.seen.append(int(self._train_counts.sum()))
        super().on_train_epoch_end(trainer, pl_module)


def _trainer(tmp_path, callbacks, epochs=3, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=kw.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        deterministic=True,
        **kw,
    )


def _fit(tmp_path, callbacks, seed=0, epochs=3, **kw):
    L.seed_everything(seed, verbose=False)
    model = _module(seed)
    _trainer(tmp_path, callbacks, epochs, **kw).fit(model, datamodule=_NoisyDM())
    return model


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_with_monitor_is_bit_identical(tmp_path, precision):
    plain = _fit(tmp_path, [], precision=precision)
    monitor = SusceptibilityMonitor(batch_size=32)
    probed = _fit(tmp_path, [monitor], precision=precision)
    assert len(monitor.history) == 3
    assert all(np.isfinite(d) for _, d in monitor.history)
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items()):
        assert torch.equal(a, b), name
    # the drops are real measurements: a different probe seed gives different drops
    other = SusceptibilityMonitor(batch_size=32, seed=1)
    _fit(tmp_path, [other], precision=precision)
    assert [d for _, d in other.history] != [d for _, d in monitor.history]


class _RandomJitterDM(_NoisyDM):
    """Like _NoisyDM, but reading a training sample draws from the global torch RNG (a random augmentation)."""

    def __init__(self):
        super().__init__()
        base = self.train_dataset

        class Jitter(torch.utils.data.Dataset):
            def __len__(self):
                return len(base)

            def __getitem__(self, i):
                x, y, idx = base[i]
                return x + 0.1 * torch.randn_like(x), y, idx

        self.train_dataset = Jitter()


def _fit_dm(tmp_path, callbacks, dm, epochs=3):
    L.seed_everything(0, verbose=False)
    model = _module(0)
    _trainer(tmp_path, callbacks, epochs).fit(model, datamodule=dm)
    return model


def test_building_the_random_label_set_leaves_training_bit_identical(tmp_path):
    """Reading the pool draws from the global RNG (random augmentation, or a shuffling unlabelled loader); the
    monitor restores it, so training is unchanged."""
    plain = _fit_dm(tmp_path, [], _RandomJitterDM())
    from_train = _fit_dm(tmp_path, [SusceptibilityMonitor(batch_size=32)], _RandomJitterDM())
    shuffled = DataLoader(TensorDataset(torch.randn(40, 6)), batch_size=8, shuffle=True)
    from_loader = _fit_dm(tmp_path, [SusceptibilityMonitor(batch_size=16, unlabelled_loader=shuffled)],
                          _RandomJitterDM())
    for other in (from_train, from_loader):
        for (name, a), (_, b) in zip(plain.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name


def test_logged_random_label_loss_is_the_loss_before_the_step(tmp_path):
    dm = _NoisyDM()
    monitor = SusceptibilityMonitor(batch_size=32)
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(6, 4, hidden=(32,), batch_norm=True), num_classes=4, lr=0.1)
    initial = copy.deepcopy(model).train()  # no dropout: the probe's first forward is deterministic
    trainer = _trainer(tmp_path, [monitor], epochs=1)
    trainer.fit(model, datamodule=dm)
    x0, y0 = monitor.probe_batch(trainer, 0)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(initial(x0), y0))
    row = monitor.logged_history[0]
    assert row["memorization/random_label_loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 < row["memorization/drop"] < row["memorization/random_label_loss"]
    assert float(trainer.callback_metrics["memorization/random_label_loss"]) == pytest.approx(expected, rel=1e-5)


def test_logged_zeta_is_running_mean_and_subset_accuracy_is_exact(tmp_path):
    dm = _NoisyDM()
    monitor = SusceptibilityMonitor(batch_size=32, every_n_epochs=1)
    L.seed_everything(0, verbose=False)
    model = _module()
    initial = copy.deepcopy(model).eval()
    trainer = _trainer(tmp_path, [monitor], epochs=2)
    trainer.fit(model, datamodule=dm)
    drops = [d for _, d in monitor.history]
    metrics = trainer.callback_metrics
    assert float(metrics["memorization/drop"]) == pytest.approx(drops[-1], rel=1e-6)
    assert float(metrics["memorization/zeta"]) == pytest.approx(sum(drops) / 2, rel=1e-6)
    # the labels are uniform over the classes, fixed, and drawn from the monitor's own seed
    labels = monitor.random_labels
    assert labels.shape == (96,)
    g = torch.Generator().manual_seed(0)
    torch.randperm(96, generator=g)  # the documented recipe: pool indices first, then the labels
    assert torch.equal(labels, torch.randint(4, (96,), generator=g))

    # epoch-1 subset accuracy is that of the model after epoch 0; check epoch 0's with a 1-epoch run instead
    monitor1 = SusceptibilityMonitor(batch_size=32, subset_accuracy="eval_pass")
    L.seed_everything(0, verbose=False)
    model1 = _module()
    trainer1 = _trainer(tmp_path, [monitor1], epochs=1)
    trainer1.fit(model1, datamodule=dm)
    x, y, _ = dm.train_dataset.tensors
    with torch.no_grad():
        correct = initial(x).argmax(1) == y
    m = dm.noise_mask
    assert float(trainer1.callback_metrics["memorization/train_acc_noisy"]) == pytest.approx(
        correct[m].float().mean().item()
    )
    assert float(trainer1.callback_metrics["memorization/train_acc_clean"]) == pytest.approx(
        correct[~m].float().mean().item()
    )


def test_train_forward_accuracy_with_frozen_model_equals_full_pass(tmp_path):
    """lr ~ 0 (steps below float32 resolution), no dropout/BN: the model is the same at every step, so the accuracy
    of the training forwards over an epoch is the accuracy of that model's predictions on the whole training set."""
    dm = _NoisyDM()
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(6, 4, hidden=(32,), dropout=0.0, batch_norm=False), num_classes=4, lr=1e-30)
    initial = copy.deepcopy(model.state_dict())
    x, y, _ = dm.train_dataset.tensors
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    m = dm.noise_mask
    expected_noisy, expected_clean = correct[m].float().mean().item(), correct[~m].float().mean().item()
    assert 0.0 < expected_noisy < 1.0 and 0.0 < expected_clean < 1.0
    monitor = SusceptibilityMonitor(batch_size=32)  # subset_accuracy="train_forward" is the default
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [monitor], epochs=2).fit(model, datamodule=dm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in initial.items())  # the premise: frozen
    assert len(monitor.logged_history) == 2
    for epoch in monitor.logged_history:
        assert epoch["memorization/train_acc_noisy"] == pytest.approx(expected_noisy)
        assert epoch["memorization/train_acc_clean"] == pytest.approx(expected_clean)


@pytest.mark.parametrize(("fold_every", "fold_numel"), [(64, 1 << 20), (2, 1 << 20), (64, 100)])
def test_train_forward_accuracy_matches_recorded_training_predictions(tmp_path, monkeypatch, fold_every, fold_numel):
    """Training model (dropout, BN, lr > 0): the logged accuracies are those of the training forwards' own
    predictions during the epoch, recorded by the module itself (logits folded into the counts at the epoch's
    end, every 2 steps, or whenever they reach 100 elements, i.e. every 2 steps of 16 x 4 logits)."""
    monkeypatch.setattr("lightning_reweight.callbacks.susceptibility._FOLD_EVERY", fold_every)
    monkeypatch.setattr("lightning_reweight.callbacks.susceptibility._FOLD_NUMEL", fold_numel)
    dm = _NoisyDM()
    torch.manual_seed(0)
    model = _Recording(MLP(6, 4, hidden=(32,), dropout=0.2, batch_norm=True), num_classes=4, lr=0.1)
    monitor = SusceptibilityMonitor(batch_size=32)
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [monitor], epochs=2).fit(model, datamodule=dm)
    assert [r["epoch"] for r in monitor.logged_history] == [0, 1]
    for logged in monitor.logged_history:
        noisy, clean, seen = _recorded_subset_accuracy(model.records[logged["epoch"]], dm.noise_mask)
        assert seen == 96
        assert logged["memorization/train_acc_noisy"] == pytest.approx(noisy)
        assert logged["memorization/train_acc_clean"] == pytest.approx(clean)


def test_train_forward_ignores_meta_reweighting_forwards(tmp_path):
    """L2RW runs extra forwards of the module in every step, after the training forward: the meta batch (same
    size 100 on digits) and the training batch at perturbed parameters (a large ``fd_eps`` makes its predictions
    differ). Only the training forward is counted: one count per training sample, and the accuracy is that of
    the recorded training predictions."""
    dm = DigitsDataModule(noise_rate=0.6, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = _Recording(MLP(64, 10, hidden=(32,)), num_classes=10, lr=0.1)
    monitor = _CountSpy(batch_size=32)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [MetaReweight(L2RW(), fd_eps=0.5), monitor], epochs=1, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    assert monitor.seen == [len(dm.train_dataset)]
    noisy, clean, seen = _recorded_subset_accuracy(model.records[0], torch.as_tensor(dm.noise_mask))
    assert seen == len(dm.train_dataset)
    assert float(trainer.callback_metrics["memorization/train_acc_noisy"]) == pytest.approx(noisy)
    assert float(trainer.callback_metrics["memorization/train_acc_clean"]) == pytest.approx(clean)


def test_subset_accuracy_is_validated():
    with pytest.raises(ValueError, match="subset_accuracy"):
        SusceptibilityMonitor(subset_accuracy="eval")


class _MaskWeights:
    """3 (noisy) or 1 (clean), times 1 or 2 by index parity: the two subsets' means differ (so a swap shows)."""

    def __init__(self, mask):
        self.mask = mask

    def sample_weights(self, losses, context):
        idx = context.indices
        return (1.0 + 2.0 * self.mask[idx].float()) * (1.0 + (idx % 2).float())


def test_weight_means_split_by_noise_mask(tmp_path):
    dm = _NoisyDM()
    model = _module()
    model.attach_weighting("by_mask", _MaskWeights(dm.noise_mask))
    monitor = SusceptibilityMonitor(batch_size=16, subset_accuracy="off")
    trainer = _trainer(tmp_path, [monitor], epochs=1)
    trainer.fit(model, datamodule=dm)
    assert "memorization/train_acc_noisy" not in trainer.callback_metrics
    idx = torch.arange(96)
    m = dm.noise_mask
    w = (1.0 + 2.0 * m.float()) * (1.0 + (idx % 2).float())
    assert w[m].mean() > 2 * w[~m].mean()  # a swap of the two would show
    assert float(trainer.callback_metrics["memorization/weight_mean_noisy"]) == pytest.approx(w[m].mean().item())
    assert float(trainer.callback_metrics["memorization/weight_mean_clean"]) == pytest.approx(w[~m].mean().item())


def test_probe_batch_differs_by_epoch_and_repeats_within_one(tmp_path):
    monitor = SusceptibilityMonitor(batch_size=16, seed=3)
    L.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, [monitor], 1)
    trainer.fit(_module(0), datamodule=_NoisyDM())
    (x0, y0), (x1, _) = monitor.probe_batch(trainer, 0), monitor.probe_batch(trainer, 1)
    again = monitor.probe_batch(trainer, 0)
    assert torch.equal(again[0], x0) and torch.equal(again[1], y0)
    assert not torch.equal(x0, x1)


def test_unlabelled_loader_and_every_n_epochs(tmp_path):
    pool = DataLoader(TensorDataset(torch.randn(40, 6)), batch_size=8)
    monitor = SusceptibilityMonitor(batch_size=16, every_n_epochs=2, unlabelled_loader=pool, seed=3)
    _fit(tmp_path, [monitor], epochs=3)
    assert [e for e, _ in monitor.history] == [0, 2]
    assert monitor.random_labels.shape == (40,)


def test_resume_restores_history_and_labels(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    monitor = SusceptibilityMonitor(batch_size=32, seed=5)
    L.seed_everything(0, verbose=False)
    model = _module()
    trainer = _trainer(
        tmp_path, [monitor, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], epochs=2, enable_checkpointing=True
    )
    trainer.fit(model, datamodule=_NoisyDM())
    path = ckpt_dir / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("SusceptibilityMonitor")]
    assert state["epochs"] == [0, 1] and torch.equal(state["labels"], monitor.random_labels)
    assert torch.equal(state["pool_indices"], torch.arange(96))

    resumed = SusceptibilityMonitor(batch_size=32, seed=5)
    L.seed_everything(0, verbose=False)
    trainer2 = _trainer(tmp_path, [resumed], epochs=4)
    trainer2.fit(_module(), datamodule=_NoisyDM(), ckpt_path=path)
    assert [e for e, _ in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == monitor.history
    assert torch.equal(resumed.random_labels, monitor.random_labels)
    assert float(trainer2.callback_metrics["memorization/zeta"]) == pytest.approx(
        sum(d for _, d in resumed.history) / 4, rel=1e-6
    )
    # the selection rule's input straight from a checkpoint file
    assert susceptibility_from_checkpoint(path) == pytest.approx(sum(d for _, d in monitor.history) / 2)
    # a subclass (the docs invite overriding logits_from_output) is stored under its own class name
    renamed = {"callbacks": {k.replace("SusceptibilityMonitor", "MyMonitor"): v for k, v in ckpt["callbacks"].items()}}
    assert susceptibility_from_checkpoint(renamed) == pytest.approx(sum(d for _, d in monitor.history) / 2)


def test_resume_mid_epoch_does_not_probe_that_epoch_twice(tmp_path):
    """A checkpoint taken inside epoch 1 (6 steps per epoch, saved after step 9): the resumed run carries the
    monitor's history of epochs 0-1 and probes epoch 2 once, with no second probe of epoch 1."""
    ckpt_dir = tmp_path / "mid"
    monitor = SusceptibilityMonitor(batch_size=32, seed=5)
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=9, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [monitor, ckpt], epochs=2, enable_checkpointing=True).fit(_module(), datamodule=_NoisyDM())
    (path,) = ckpt_dir.glob("step=9*.ckpt")
    resumed = SusceptibilityMonitor(batch_size=32, seed=5)
    _trainer(tmp_path, [resumed], epochs=3).fit(_module(), datamodule=_NoisyDM(), ckpt_path=path)
    assert [e for e, _ in resumed.history] == [0, 1, 2]
    assert resumed.history[:2] == monitor.history


def test_the_probe_sees_the_modes_the_modules_own_epoch_start_sets(tmp_path):
    """A fine-tuning module puts its backbone in eval mode in its own on_train_epoch_start (which Lightning runs
    after the callbacks'): every probe, the first included, runs the model in the mode its training forwards see."""

    class Frozen(ReweightClassifier):
        def on_train_epoch_start(self):
            self.backbone.eval()

    class Spy(SusceptibilityMonitor):
        def compute_logits(self, pl_module, inputs):
            probe_modes.append(pl_module.backbone.training)
            return super().compute_logits(pl_module, inputs)

    class TrainModes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            train_modes.add(pl_module.backbone.training)

    probe_modes, train_modes = [], set()
    torch.manual_seed(0)
    model = Frozen(MLP(6, 4, hidden=(32,), dropout=0.2, batch_norm=True), num_classes=4, lr=0.1)
    _trainer(tmp_path, [Spy(batch_size=16), TrainModes()], epochs=2).fit(model, datamodule=_NoisyDM())
    assert train_modes == {False}
    assert probe_modes == [False, False, False, False]  # two forwards per probe, two epochs


def test_resume_from_an_epochs_last_batch_measures_the_next_epoch(tmp_path):
    """A step checkpoint at an epoch's last batch (6 steps per epoch, saved after step 6): Lightning resumes into
    epoch 1 without on_train_epoch_start; epoch 1 must still be measured, with the uninterrupted run's drop."""
    ckpt_dir = tmp_path / "last_batch"
    straight = SusceptibilityMonitor(batch_size=32, seed=5)
    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    _trainer(tmp_path, [straight, ckpt], epochs=3, enable_checkpointing=True).fit(_module(), datamodule=_NoisyDM())
    (path,) = ckpt_dir.glob("step=6*.ckpt")
    resumed = SusceptibilityMonitor(batch_size=32, seed=5)
    _trainer(tmp_path, [resumed], epochs=3).fit(_module(), datamodule=_NoisyDM(), ckpt_path=path)
    assert [e for e, _ in resumed.history] == [0, 1, 2]
    assert resumed.history[:1] == straight.history[:1]
    assert any(r.get("epoch") == 1 and "memorization/train_acc_noisy" in r for r in resumed.logged_history)
    # epoch 0's end values (Lightning runs no end hook for it after the resume) come from the checkpoint's records

    def epoch_end(monitor, epoch):
        return [{k: v for k, v in r.items() if "train_acc" in k} for r in monitor.logged_history if r["epoch"] == epoch]

    assert epoch_end(straight, 0)[0]  # the uninterrupted run has them
    assert epoch_end(resumed, 0) == epoch_end(straight, 0)


class _StepWeights:
    """Weights that change with the step (so that a lost or doubled batch shows in the epoch's weight means)."""

    def sample_weights(self, losses, context):
        step = context.module.trainer.global_step
        return 1.0 + 0.1 * step + (context.indices % 3).float()


def _masked_run(tmp_path, datamodule, ckpt_path=None, callbacks=()):
    """Three epochs of a small classifier with step-dependent weights and a monitor; the monitor."""
    L.seed_everything(0, verbose=False)
    model = ReweightClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    model.attach_weighting("steps", _StepWeights())
    monitor = SusceptibilityMonitor(batch_size=32, seed=5)
    _trainer(tmp_path, [monitor, *callbacks], epochs=3, enable_checkpointing=bool(callbacks)).fit(
        model, datamodule=datamodule(), ckpt_path=ckpt_path)
    return monitor


def test_mid_epoch_resume_keeps_the_epochs_subset_accuracy_and_weight_means(tmp_path):
    """A mid-epoch checkpoint carries the epoch's training-forward counts and weights; with a loader that resumes
    its position, the resumed epoch logs the uninterrupted run's noisy/clean accuracy and weight means."""
    from resumable_data import MaskedData

    def run(ckpt_path=None, callbacks=()):
        return _masked_run(tmp_path, MaskedData, ckpt_path, callbacks)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    straight = run(callbacks=[ckpt])
    resumed = run(ckpt_path=tmp_path / "mid" / "step=8.ckpt")  # epoch 1 (6 batches), after its 2nd batch

    def epoch_values(monitor, epoch):
        merged = {}
        for record in monitor.logged_history:
            if record.get("epoch") == epoch:
                merged.update(record)
        return merged

    keys = ("memorization/train_acc_noisy", "memorization/train_acc_clean", "memorization/weight_mean_noisy",
            "memorization/weight_mean_clean")
    for epoch in (1, 2):
        want, got = epoch_values(straight, epoch), epoch_values(resumed, epoch)
        assert all(k in want for k in keys)
        for key in keys:
            assert got.get(key) == pytest.approx(want[key], rel=1e-6), (epoch, key)
    assert resumed.history == straight.history


def test_state_key_follows_the_prefix():
    # Lightning's convention for keyed callback states: the class name and the repr of the keying arguments
    monitor = SusceptibilityMonitor()
    assert monitor.state_key == "SusceptibilityMonitor{'prefix': 'memorization'}"
    assert monitor.state_key == SusceptibilityMonitor(prefix="memorization").state_key
    monitor.prefix = "probe"
    assert monitor.state_key == "SusceptibilityMonitor{'prefix': 'probe'}"


def test_a_reused_monitor_starts_a_new_fit_afresh(tmp_path):
    """A monitor fitted once and reused for a new (not resumed) fit on other data measures exactly as a new one."""
    used = SusceptibilityMonitor(batch_size=16, pool_size=48)
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [used], 2).fit(_module(), datamodule=_NoisyDM(n=64, seed=1))
    fresh = SusceptibilityMonitor(batch_size=16, pool_size=48)
    for monitor in (used, fresh):
        _fit(tmp_path, [monitor], epochs=2)
    assert [e for e, _ in used.history] == [0, 1]
    assert used.history == fresh.history and torch.equal(used.random_labels, fresh.random_labels)
    assert used.logged_history == fresh.logged_history


class _DictOutput(ReweightClassifier):
    """A forward that returns a dict of logits and features (the subset accuracy reads the logits from it)."""

    def forward(self, x):
        return {"features": x, "logits": self.backbone(x)}

    def per_sample_loss(self, batch):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x)["logits"], y, reduction="none")


def test_a_forward_returning_a_dict_of_logits_is_read_through_logits_from_output(tmp_path):
    """Same drops and subset accuracies as the same network whose forward returns the logits themselves."""
    runs = []
    for cls in (ReweightClassifier, _DictOutput):
        monitor = SusceptibilityMonitor(batch_size=16)
        L.seed_everything(0, verbose=False)
        torch.manual_seed(0)
        model = cls(MLP(6, 4, hidden=(32,), dropout=0.2, batch_norm=True), num_classes=4, lr=0.1)
        _trainer(tmp_path, [monitor], 2).fit(model, datamodule=_NoisyDM())
        runs.append(monitor.logged_history)
    assert runs[0] == runs[1]
    assert all("memorization/train_acc_noisy" in r and "memorization/drop" in r for r in runs[1])


def test_unreadable_outputs_and_samples_are_reported(tmp_path):
    class Features(_DictOutput):
        def forward(self, x):
            return {"features": self.backbone(x)}

        def per_sample_loss(self, batch):
            x, y, _ = batch
            return nn.functional.cross_entropy(self(x)["features"], y, reduction="none")

    torch.manual_seed(0)
    model = Features(MLP(6, 4, hidden=(8,)), num_classes=4, lr=0.1)
    with pytest.raises(TypeError, match="override SusceptibilityMonitor.logits_from_output"):
        _trainer(tmp_path, [SusceptibilityMonitor(batch_size=16)], 1).fit(model, datamodule=_NoisyDM())

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"pixels": torch.zeros(6), "label": 0}

    pool = DataLoader(Samples(), batch_size=8)
    monitor = SusceptibilityMonitor(batch_size=16, unlabelled_loader=pool)
    with pytest.raises(TypeError, match=r"keys \['label', 'pixels'\].*unlabelled_loader"):
        _fit(tmp_path, [monitor], epochs=1)


def test_missing_num_classes_is_reported(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 4)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _NoisyDM()
    loader = DataLoader(dm.train_dataset, batch_size=16)
    with pytest.raises(ValueError, match="num_classes"):
        _trainer(tmp_path, [SusceptibilityMonitor()], epochs=1).fit(Plain(), train_dataloaders=loader)
    monitor = SusceptibilityMonitor(num_classes=4, batch_size=16)
    _trainer(tmp_path, [monitor], epochs=1).fit(Plain(), train_dataloaders=loader)
    assert len(monitor.history) == 1


# ---------------------------------------------------------------------------------------------------------------
# DDP


_LOCAL_PROBES: list[tuple[float, float]] = []  # this process's (loss before, loss after), before the DDP mean
_LOCAL_EVAL_COUNTS: list[list[float]] = []  # this process's eval-pass counts, before the DDP sum


class _RecordZeta(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        monitor, eval_pass = (c for c in trainer.callbacks if isinstance(c, SusceptibilityMonitor))
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt")
        torch.save({"drops": [d for _, d in monitor.history], "zeta": monitor.zeta, "logged": monitor.logged_history,
                    "eval_pass": eval_pass.logged_history, "records": pl_module.records,
                    "local_probes": list(_LOCAL_PROBES), "local_eval_counts": list(_LOCAL_EVAL_COUNTS)}, path)


@pytest.mark.ddp
def test_ddp_ranks_agree_on_zeta(tmp_path, monkeypatch):
    import lightning_reweight.callbacks.susceptibility as monitor_module

    probe = monitor_module.susceptibility_losses

    def recorded(*args, **kwargs):
        before, after = probe(*args, **kwargs)
        # the ranks' own probes are identical here (same parameters, same batch): a rank-dependent offset makes
        # their mean differ from each rank's own value, so the check below sees the reduction over ranks
        before = before + 0.1 * torch.distributed.get_rank()
        _LOCAL_PROBES.append((float(before), float(after)))
        return before, after

    monkeypatch.setattr(monitor_module, "susceptibility_losses", recorded)  # the forked ranks inherit it
    counts_of = SusceptibilityMonitor._subset_counts

    def recorded_counts(self, *args, **kwargs):
        counts = counts_of(self, *args, **kwargs)
        _LOCAL_EVAL_COUNTS.append(counts.tolist())
        return counts

    monkeypatch.setattr(SusceptibilityMonitor, "_subset_counts", recorded_counts)
    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = _Recording(MLP(6, 4, hidden=(32,), dropout=0.2, batch_norm=True), num_classes=4, lr=0.1)
    dm = _NoisyDM()
    model.attach_weighting("by_mask", _MaskWeights(dm.noise_mask))  # weight means over both ranks' samples
    x, y, _ = dm.train_dataset.tensors
    with torch.no_grad():
        correct = copy.deepcopy(model).eval()(x).argmax(1) == y
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        callbacks=[
            SusceptibilityMonitor(batch_size=16),
            SusceptibilityMonitor(batch_size=16, subset_accuracy="eval_pass", prefix="evalpass"),
            _RecordZeta(str(tmp_path)),
        ],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert len(r0["drops"]) == 2
    # the logged drop is the mean over ranks of each rank's own probe (two monitors probe each epoch, in order)
    for epoch, drop in enumerate(r0["drops"]):
        local = [r[2 * epoch][0] - r[2 * epoch][1] for r in (r0["local_probes"], r1["local_probes"])]
        assert drop == pytest.approx(sum(local) / 2, rel=1e-5)
    assert {k: r0[k] for k in ("drops", "zeta", "logged", "eval_pass")} == {
        k: r1[k] for k in ("drops", "zeta", "logged", "eval_pass")
    }
    # the weight means are over both ranks' samples: every training sample once per epoch
    m = dm.noise_mask
    w = (1.0 + 2.0 * m.float()) * (1.0 + (torch.arange(96) % 2).float())
    for logged in r0["logged"]:
        assert logged["memorization/weight_mean_noisy"] == pytest.approx(w[m].mean().item())
        assert logged["memorization/weight_mean_clean"] == pytest.approx(w[~m].mean().item())
    # default route: the counts of each rank's training forwards, summed over ranks, per epoch
    for logged in r0["logged"]:
        records = r0["records"][logged["epoch"]] + r1["records"][logged["epoch"]]
        noisy, clean, seen = _recorded_subset_accuracy(records, dm.noise_mask)
        assert seen == 96
        assert logged["memorization/train_acc_noisy"] == pytest.approx(noisy)
        assert logged["memorization/train_acc_clean"] == pytest.approx(clean)
    # eval pass: each rank evaluates half of the training set; the summed counts give the full-set accuracy
    for r in (r0, r1):
        assert [c[1] + c[3] for c in r["local_eval_counts"]] == [48, 48]  # noisy + clean seen by this rank, per epoch
    epoch0 = r0["eval_pass"][0]
    assert epoch0["evalpass/train_acc_noisy"] == pytest.approx(correct[dm.noise_mask].float().mean().item())
    assert epoch0["evalpass/train_acc_clean"] == pytest.approx(correct[~dm.noise_mask].float().mean().item())


# ---------------------------------------------------------------------------------------------------------------
# select_models


def test_select_models_quadrants():
    acc = [0.95, 0.90, 0.60, 0.50, 0.92]
    zeta = [0.10, 0.80, 0.20, 0.90, 0.30]
    # thresholds written out: mean acc = 3.87 / 5 = 0.774, mean zeta = 2.3 / 5 = 0.46
    sel = select_models(acc, zeta, names=["a", "b", "c", "d", "e"])
    assert sel.accuracy_threshold == pytest.approx(0.774)
    assert sel.susceptibility_threshold == pytest.approx(0.46)
    assert sel.quadrants == (
        "high_acc_low_zeta",
        "high_acc_high_zeta",
        "low_acc_low_zeta",
        "low_acc_high_zeta",
        "high_acc_low_zeta",
    )
    assert sel.preferred == ("a", "e")
    assert sel.as_dict()["preferred"] == ["a", "e"]
    # on the threshold (exact in binary): accuracy at the mean counts as high, zeta at the mean as high
    tie = select_models([1.0, 0.5, 0.75], [0.25, 0.75, 0.5])
    assert (tie.accuracy_threshold, tie.susceptibility_threshold) == (0.75, 0.5)
    assert tie.quadrants[2] == "high_acc_high_zeta"
    # a model at the mean of decimal accuracies (0.1 + 0.2 + 0.3 summed left to right rounds above 0.6)
    mid = select_models([0.1, 0.2, 0.3], [0.5, 0.1, 0.5], names=["a", "b", "c"])
    assert mid.quadrant_of("b") == "high_acc_low_zeta" and mid.preferred == ("b",)



def test_select_models_compares_with_the_exact_mean():
    """fsum(x) / n rounds twice: for [0.901] * 3 it gave 0.9010000000000001, so three equal accuracies were all
    "low" and nothing was preferred. By the rule (accuracy >= the mean is high) equal values are all high, and
    equal zetas are all high (zeta < the mean is low)."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(2, 11, (1,), generator=rng))
        value = round(float(torch.rand(1, generator=rng)), 3)
        sel = select_models([value] * n, [float(z) for z in torch.rand(n, generator=rng)])
        assert all(q.startswith("high_acc") for q in sel.quadrants), (value, n)
        sel = select_models([float(a) for a in torch.rand(n, generator=rng)], [value] * n)
        assert all(q.endswith("high_zeta") for q in sel.quadrants), (value, n)
    assert select_models([0.901] * 3, [0.25, 0.5, 0.75], names=["a", "b", "c"]).preferred == ("a",)


def test_select_models_places_decimal_values_as_their_decimals_would_be():
    """Reference: the decimals themselves, in exact rationals. The binary float of 0.6 lies below the exact mean
    of the binary floats of 0.3, 0.6 and 0.9, so an exact float comparison called the middle model low accuracy
    (and, for zeta, low zeta), against the documented tie rule."""
    from fractions import Fraction

    assert select_models([0.3, 0.6, 0.9], [0.1, 0.2, 0.3]).quadrants[1] == "high_acc_high_zeta"
    assert select_models([3 / 10, 6 / 10, 9 / 10], [0.5, 0.5, 0.5]).quadrants[1] == "high_acc_high_zeta"
    assert select_models([0.9, 0.6, 0.3], [0.3, 0.6, 0.9], names="abc").quadrant_of("b") == "high_acc_high_zeta"
    rng = torch.Generator().manual_seed(1)
    checked_ties = 0
    for _ in range(2000):
        n = int(torch.randint(2, 8, (1,), generator=rng))
        acc_k = torch.randint(0, 101, (n,), generator=rng).tolist()  # accuracies in hundredths
        zeta_k = torch.randint(0, 301, (n,), generator=rng).tolist()
        last = n * acc_k[0] - sum(acc_k[:-1])  # the last value that puts the first model exactly at the mean
        if 0 <= last <= 100:
            acc_k[-1] = last
        acc = [k / 100 for k in acc_k]
        zeta = [k / 100 for k in zeta_k]
        sel = select_models(acc, zeta)
        acc_mean = Fraction(sum(acc_k), 100 * n)
        zeta_mean = Fraction(sum(zeta_k), 100 * n)
        for i in range(n):
            high = Fraction(acc_k[i], 100) >= acc_mean
            low = Fraction(zeta_k[i], 100) < zeta_mean
            checked_ties += Fraction(acc_k[i], 100) == acc_mean
            expected = ("high_acc" if high else "low_acc") + ("_low_zeta" if low else "_high_zeta")
            assert sel.quadrants[i] == expected, (acc_k, zeta_k, i)
    assert checked_ties > 100


def test_select_models_refuses_a_mapping():
    with pytest.raises(TypeError, match="mapping"):
        select_models({1: 0.9, 2: 0.8}, [0.1, 0.2])


def test_select_models_validates():
    with pytest.raises(ValueError, match="susceptibility"):
        select_models([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="empty"):
        select_models([], [])
    assert select_models([0.5, 0.7], [0.2, 0.1]).names == ("0", "1")
    # a nan would make both thresholds nan and put every model in low_acc_high_zeta silently
    with pytest.raises(ValueError, match=r"susceptibility is not finite for model\(s\) \['b'\]"):
        select_models([0.9, 0.95, 0.5], [0.1, float("nan"), 0.2], names=["a", "b", "c"])
    with pytest.raises(ValueError, match="train_accuracy is not finite"):
        select_models([float("inf"), 0.95], [0.1, 0.2])


def test_plot_model_selection(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from lightning_reweight.metrics import plot_model_selection

    fig = plot_model_selection(select_models([0.9, 0.5, 0.8], [0.1, 0.5, 0.2], names=["x", "y", "z"]))
    fig.savefig(tmp_path / "sel.png")
    assert (tmp_path / "sel.png").stat().st_size > 0
    # the preferred quadrant's shading reaches the axes' left and top edges (it used to widen the axes past it)
    ax = fig.axes[0]
    (shading,) = [c for c in ax.collections if c.get_alpha() == pytest.approx(0.08)]
    vertices = shading.get_paths()[0].vertices
    assert vertices[:, 0].min() == pytest.approx(ax.get_xlim()[0])
    assert vertices[:, 1].max() == pytest.approx(ax.get_ylim()[1])
    # built without pyplot (no global figure per call), and a user's axes keep autoscaling afterwards
    import matplotlib.pyplot as plt

    open_figures = len(plt.get_fignums())
    for _ in range(3):
        plot_model_selection(select_models([0.9, 0.5], [0.1, 0.5]))
    assert len(plt.get_fignums()) == open_figures
    user_fig, user_ax = plt.subplots()
    plot_model_selection(select_models([0.9, 0.5], [0.1, 0.5]), ax=user_ax)
    assert user_ax.get_autoscalex_on() and user_ax.get_autoscaley_on()
    plt.close(user_fig)


def test_plot_model_selection_puts_zeta_on_x_and_accuracy_on_y():
    """Each model's point is (zeta, train accuracy); the vertical line is the mean zeta, the horizontal one the mean
    accuracy (the means written out)."""
    pytest.importorskip("matplotlib")
    from lightning_reweight.metrics import plot_model_selection

    acc, zeta = [0.9, 0.5, 0.8], [0.1, 0.5, 0.3]
    fig = plot_model_selection(select_models(acc, zeta, names=["x", "y", "z"]))
    ax = fig.axes[0]
    points = sorted(tuple(map(float, p)) for c in ax.collections if c.get_alpha() != pytest.approx(0.08)
                    for p in c.get_offsets())
    assert np.allclose(points, sorted(zip(zeta, acc)))
    vertical = [line for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[1]]
    horizontal = [line for line in ax.get_lines() if line.get_ydata()[0] == line.get_ydata()[1]]
    assert [line.get_xdata()[0] for line in vertical] == [pytest.approx(0.9 / 3)]  # mean zeta
    assert [line.get_ydata()[0] for line in horizontal] == [pytest.approx(2.2 / 3)]  # mean accuracy


def test_preferred_models_with_equal_accuracy_are_ordered_by_lower_zeta():
    """Best train accuracy first; between equal accuracies the lower zeta (the rule's intent) comes first."""
    sel = select_models([0.9, 0.9, 0.95, 0.2], [0.3, 0.1, 0.35, 0.9], names=["a", "b", "c", "d"])
    assert sel.preferred == ("c", "b", "a")


# ---------------------------------------------------------------------------- review of the monitor as a user
def test_model_checkpoint_on_zeta_survives_a_resume_into_an_unmeasured_epoch(tmp_path):
    """``every_n_epochs=2``, resumed after epoch 0: epoch 1 does not measure, and Lightning empties
    callback_metrics at fit start; the monitor puts its latest values back (ModelCheckpoint used to fail to
    find ``memorization/zeta``)."""
    first = SusceptibilityMonitor(batch_size=32, every_n_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="memorization/zeta", save_top_k=-1, filename="{epoch}")
    _fit(tmp_path, [first, ckpt], epochs=1, enable_checkpointing=True)
    zeta0 = first.zeta
    resumed = SusceptibilityMonitor(batch_size=32, every_n_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="memorization/zeta", save_top_k=-1, filename="{epoch}")
    seen = {}

    class Peek(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = float(trainer.callback_metrics["memorization/zeta"])

    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [resumed, Peek(), ckpt], 3, enable_checkpointing=True).fit(
        _module(0), datamodule=_NoisyDM(), ckpt_path=tmp_path / "ck" / "epoch=0.ckpt")
    assert seen[1] == pytest.approx(zeta0)  # the checkpoint's zeta in the unmeasured epoch
    assert seen[2] == pytest.approx(resumed.zeta) and len(resumed.history) == 2
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt"]


def test_resuming_with_other_measurement_settings_is_an_error(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", filename="last")
    _fit(tmp_path, [SusceptibilityMonitor(batch_size=32), ckpt], epochs=1, enable_checkpointing=True)
    for kwargs, named in (({"seed": 5}, "seed=0 (now 5)"), ({"pool_size": 50}, "pool_size=2048 (now 50)"),
                          ({"batch_size": 16}, "batch_size=32 (now 16)")):
        monitor = SusceptibilityMonitor(**{"batch_size": 32, **kwargs})
        with pytest.raises(ValueError, match=re.escape(named)):
            _trainer(tmp_path, [monitor], 2).fit(_module(0), datamodule=_NoisyDM(),
                                                ckpt_path=tmp_path / "ck" / "last.ckpt")


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precisions_probe_with_inputs_of_the_models_dtype(tmp_path, precision):
    """The probe's inputs go through the precision's ``convert_input`` (they stayed float32: dtype mismatch)."""
    monitor = SusceptibilityMonitor(batch_size=32, subset_accuracy="eval_pass")
    _fit(tmp_path, [monitor], epochs=1, precision=precision)
    (record,) = monitor.logged_history
    assert math.isfinite(record["memorization/drop"]) and "memorization/train_acc_noisy" in record


class _NoOptimizer(ReweightClassifier):
    def configure_optimizers(self):
        return None


class _LBFGS(ReweightClassifier):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters())


def test_optimizers_the_probe_cannot_step_are_refused_clearly(tmp_path):
    torch.manual_seed(0)
    backbone = MLP(6, 4, hidden=(8,))
    with pytest.raises(ValueError, match="configure_optimizers returned none"):
        _trainer(tmp_path, [SusceptibilityMonitor()], 1).fit(_NoOptimizer(backbone, 4), datamodule=_NoisyDM())
    with pytest.raises(ValueError, match="LBFGS: its step needs a closure"):
        _trainer(tmp_path, [SusceptibilityMonitor()], 1).fit(_LBFGS(backbone, 4), datamodule=_NoisyDM())
    with pytest.raises(ValueError, match="needs a closure"):
        susceptibility_step(backbone, torch.optim.LBFGS(backbone.parameters()), torch.randn(4, 6), torch.arange(4))


def test_num_classes_is_checked_against_the_logits_and_read_from_hparams(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=3 classes, but the model's logits have shape \(32, 4\)"):
        _fit(tmp_path, [SusceptibilityMonitor(batch_size=32, num_classes=3)], epochs=1)

    class HparamsOnly(L.LightningModule):  # num_classes only in hparams; no datamodule attribute either
        def __init__(self, num_classes=4):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Linear(6, num_classes)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monitor = SusceptibilityMonitor(batch_size=32)
    data = _NoisyDM()
    _trainer(tmp_path, [monitor], 1).fit(HparamsOnly(), DataLoader(data.train_dataset, batch_size=16))
    assert monitor.num_classes == 4 and int(monitor.random_labels.max()) == 3


def test_an_iterable_training_set_points_to_unlabelled_loader(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(64):
                yield torch.randn(6, generator=g), int(torch.randint(4, (), generator=g))

    with pytest.raises(ValueError, match="has no length.*unlabelled_loader"):
        _trainer(tmp_path, [SusceptibilityMonitor(batch_size=16)], 1).fit(_module(0), DataLoader(Stream(), 16))


def test_values_are_logged_on_lightnings_step_axis_with_two_optimizers(tmp_path):
    """global_step counts both optimizers' steps; Lightning writes its own values at the batches that stepped."""
    from lightning.pytorch.loggers import Logger

    class Capture(Logger):
        name, version = "capture", 0
        steps: dict[str, list[int]] = {}

        def log_metrics(self, metrics, step=None):
            for k in metrics:
                self.steps.setdefault(k, []).append(step)

        def log_hyperparams(self, *args, **kwargs):
            pass

    torch.manual_seed(0)
    model = TwoOptimizers(MLP(6, 4, hidden=(8,)), num_classes=4)
    logger = Capture()
    with pytest.warns(UserWarning, match="steps only the first of the 2 optimizers"):
        _trainer(tmp_path, [SusceptibilityMonitor(batch_size=32)], 2, logger=logger, log_every_n_steps=1).fit(
            model, datamodule=_NoisyDM())
    batches = len(_NoisyDM().train_dataloader())
    assert logger.steps["train_loss"] == list(range(2 * batches))  # Lightning's axis: one step per batch
    assert logger.steps["memorization/zeta"] == [0, batches]  # each epoch's start, on that axis (not 2x)


def test_each_input_keeps_its_random_label_for_the_whole_run(tmp_path, monkeypatch):
    """zeta averages drops on one randomly labelled set: an input's random label is drawn once for the run. Read
    from what the probe is handed each epoch (inputs matched to the training set by value), independently of how
    the monitor picks its batches; a monitor redrawing the labels every epoch passed every other test."""
    import lightning_reweight.callbacks.susceptibility as module

    real = module.susceptibility_losses
    seen = []

    def recording(model, optimizer, inputs, random_targets, **kwargs):
        seen.append((inputs.detach().cpu().clone(), random_targets.detach().cpu().clone()))
        return real(model, optimizer, inputs, random_targets, **kwargs)

    monkeypatch.setattr(module, "susceptibility_losses", recording)
    _fit(tmp_path, [SusceptibilityMonitor(batch_size=32)], epochs=4)
    train_x = _NoisyDM().train_dataset.tensors[0]
    label_of: dict[int, int] = {}
    repeats = 0
    for inputs, targets in seen:
        rows = [int(torch.nonzero((train_x == row).all(dim=1)).flatten()[0]) for row in inputs]
        for index, label in zip(rows, targets.tolist()):
            repeats += index in label_of
            assert label_of.setdefault(index, label) == label, (index, label_of[index], label)
    assert len(seen) == 4 and repeats >= 32  # inputs recur across epochs, so the check has teeth
    assert len(set(label_of.values())) > 1


def test_a_non_finite_probe_is_skipped_not_poisoning_zeta(tmp_path, monkeypatch):
    """An fp16 overflow in the (unscaled) probe step gives a nan drop; zeta, a running mean, would stay nan."""
    import lightning_reweight.callbacks.susceptibility as module

    real = module.susceptibility_losses
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        before, after = real(*args, **kwargs)
        return (before, torch.full_like(after, float("nan"))) if len(calls) == 2 else (before, after)

    monkeypatch.setattr(module, "susceptibility_losses", flaky)
    monitor = SusceptibilityMonitor(batch_size=32)
    with pytest.warns(UserWarning, match="drop is nan at epoch 1; measurement skipped"):
        _fit(tmp_path, [monitor], epochs=3)
    assert [e for e, _ in monitor.history] == [0, 2] and math.isfinite(monitor.zeta)


def test_subset_accuracy_reads_the_batch_through_the_modules_hook(tmp_path):
    """Batches (x, y, per-sample float): the monitor read the third element as indices itself (IndexError), even
    with the module's batch_targets_and_indices overridden as the contract's warning advises."""
    from logging_data import NoisyBlobs

    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.models import MLP

    class WithScores(NoisyBlobs):
        def train_dataloader(self):
            x, y, i = self.train_dataset.tensors
            four = torch.utils.data.TensorDataset(x, y, i, torch.rand(len(y)))
            return torch.utils.data.DataLoader(four, batch_size=16, shuffle=True)

    class Hooked(ReweightClassifier):
        def batch_targets_and_indices(self, batch):
            return batch[1], batch[2]

        def per_sample_loss(self, batch):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1], reduction="none")

    monitor = SusceptibilityMonitor(batch_size=16)
    torch.manual_seed(0)
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, default_root_dir=tmp_path, callbacks=[monitor]).fit(
        Hooked(MLP(5, 3, hidden=(16,)), num_classes=3), datamodule=WithScores())
    logged = monitor.logged_history[-1]
    assert 0.0 <= logged["memorization/train_acc_noisy"] <= 1.0 and 0.0 <= logged["memorization/train_acc_clean"] <= 1


def test_unreadable_train_batches_say_that_no_targets_were_found(tmp_path):
    """Dict batches without the module's hook: the warning said the batches carried no indices, not that the
    monitor could not read them at all."""
    from logging_data import NoisyBlobs

    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.models import MLP

    class Dicts(NoisyBlobs):
        def train_dataloader(self):
            x, y, i = self.train_dataset.tensors
            rows = [{"x": x[k], "y": y[k]} for k in range(len(y))]
            return torch.utils.data.DataLoader(rows, batch_size=16)

    class DictModule(ReweightClassifier):
        def per_sample_loss(self, batch):
            return torch.nn.functional.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    with pytest.warns(UserWarning, match="subset accuracy disabled .*no targets found in the train batches"):
        L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                  enable_model_summary=False, default_root_dir=tmp_path,
                  callbacks=[SusceptibilityMonitor(batch_size=16)]).fit(
            DictModule(MLP(5, 3, hidden=(8,)), num_classes=3), datamodule=Dicts())


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.head.parameters(), lr=0.1, momentum=0.9),  # the plain-SGD route
    lambda m: torch.optim.Adam(m.head.parameters(), lr=0.1),  # the generic route
])
def test_a_frozen_parameter_the_forward_writes_is_restored(make):
    """The plain-SGD route restored only the stepped parameters: a frozen Embedding(max_norm=...) table, which the
    forward renormalises in place, stayed modified after the probe."""

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6, max_norm=0.5)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(1)
    model = Bag()
    model.emb.weight.requires_grad_(False)
    before = model.emb.weight.detach().clone()
    susceptibility_step(model, make(model), torch.randint(0, 20, (8, 4)), torch.randint(0, 3, (8,)))
    assert torch.equal(model.emb.weight, before)


def test_the_sgd_route_copies_no_frozen_backbone(monkeypatch):
    """Restoring every parameter (to cover an in-place-written frozen embedding) copied a frozen backbone on every
    probe (a linear probe on a large frozen network paid about three times the probe's cost): only the stepped
    parameters, the buffers and the parameters a forward writes in place are saved."""
    import lightning_reweight.functional.susceptibility as module

    saved = []
    real = module._restored_values

    def recording(tensors):
        saved.extend(id(t) for t in tensors)
        return real(tensors)

    monkeypatch.setattr(module, "_restored_values", recording)
    torch.manual_seed(0)
    backbone, emb, head = nn.Linear(6, 6), nn.Embedding(10, 6, max_norm=1.0), nn.Linear(6, 3)
    for p in [*backbone.parameters(), emb.weight]:
        p.requires_grad_(False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.emb, self.head = backbone, emb, head

        def forward(self, x):
            return self.head(self.backbone(x[:, :6].float()) + self.emb(x[:, 6].long()))

    net = Net()
    x = torch.cat([torch.randn(8, 6), torch.randint(0, 10, (8, 1)).float()], 1)
    susceptibility_step(net, torch.optim.SGD(head.parameters(), lr=0.1), x, torch.randint(3, (8,)))
    assert {id(p) for p in head.parameters()} | {id(emb.weight)} <= set(saved)
    assert not {id(p) for p in backbone.parameters()} & set(saved)


def test_subset_accuracy_leaves_out_meta_reweightings_early_forwards_whatever_the_callback_order(tmp_path):
    """L2RW computes its alignment in on_train_batch_start, with a forward of the training batch at shifted
    parameters: a monitor listed before MetaReweight (armed first) counted that forward as the training forward.
    Either order must give the accuracies of the training forwards themselves (recorded by the module)."""
    from resumable_data import MaskedData

    from lightning_reweight.callbacks import MetaReweight
    from lightning_reweight.meta import L2RW

    for order in ("meta_first", "monitor_first"):
        L.seed_everything(0, verbose=False)
        torch.manual_seed(0)
        model = _Recording(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
        monitor = SusceptibilityMonitor(batch_size=32, seed=5)
        meta = MetaReweight(L2RW(), hypergrad="finite_diff", fd_eps=0.5)  # a large shift: other predictions
        dm = MaskedData()
        callbacks = [meta, monitor] if order == "meta_first" else [monitor, meta]
        _trainer(tmp_path, callbacks, epochs=1).fit(model, datamodule=dm)
        noisy, clean, seen = _recorded_subset_accuracy(model.records[0], dm.noise_mask)
        assert seen == 240
        logged = monitor.logged_history[0]
        assert logged["memorization/train_acc_noisy"] == pytest.approx(noisy), order
        assert logged["memorization/train_acc_clean"] == pytest.approx(clean), order


class _ValidatedNoisyDM(_NoisyDM):
    def val_dataloader(self):
        x, y, _ = self.train_dataset.tensors
        return DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16)


@pytest.mark.parametrize("case", ["last_batch", "final_last_batch", "validation_end"])
def test_a_checkpoint_after_an_epochs_last_batch_resumes_to_its_end_values_once(tmp_path, case):
    """The checkpoint's epoch (its batches all done, its end hook not yet run) gets its end values once, with the
    uninterrupted run's values and step: at the last batch of a middle epoch, of the final epoch (no batch runs
    after that resume), or at validation's end (Lightning then runs the epoch's end hook itself)."""
    import csv

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    path, saver = {
        "last_batch": ("step=6.ckpt", {"every_n_train_steps": 6}),
        "final_last_batch": ("step=18.ckpt", {"every_n_train_steps": 6}),
        "validation_end": ("step=6.ckpt", {"save_on_train_epoch_end": False}),
    }[case]
    epoch = {"final_last_batch": 2}.get(case, 0)
    data = _ValidatedNoisyDM if case == "validation_end" else _NoisyDM

    def run(name, ckpt_path=None, callbacks=()):
        L.seed_everything(0, verbose=False)
        monitor = SusceptibilityMonitor(batch_size=32, seed=5)
        _trainer(tmp_path, [monitor, *callbacks], epochs=3, enable_checkpointing=bool(callbacks),
                 logger=CSVLogger(tmp_path, name=name)).fit(_module(), datamodule=data(), ckpt_path=ckpt_path)
        with open(tmp_path / name / "version_0" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("memorization/train_acc_noisy")]
        return {(int(r["epoch"]), int(r["step"])): float(r["memorization/train_acc_noisy"]) for r in rows}, [
            (int(r["epoch"]), int(r["step"])) for r in rows]

    straight, _ = run("straight", callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{step}",
                                                              **saver)])
    resumed, resumed_rows = run("resumed", ckpt_path=tmp_path / path)
    assert sorted(straight) == [(0, 5), (1, 11), (2, 17)]
    assert len(resumed_rows) == len(set(resumed_rows))  # each epoch's values once
    key = (epoch, 6 * epoch + 5)
    assert resumed[key] == pytest.approx(straight[key])
    assert sorted(resumed) == sorted(straight)[epoch:]


# ---------------------------------------------------------------------------- from the fourth mutation audit
def test_a_last_batch_resume_gives_the_closed_epoch_its_weight_means_and_histograms(tmp_path, monkeypatch):
    """A checkpoint at epoch 0's last batch (step 6 of 6 per epoch): epoch 0's weight means are computed at train
    start from the checkpoint's weights and must be recorded under epoch 0, with the uninterrupted run's values,
    and its histograms written at epoch 0's last step (5), as the uninterrupted run writes them."""
    from resumable_data import MaskedData

    import lightning_reweight.callbacks.susceptibility as susceptibility

    histograms = []
    real = susceptibility.log_histograms

    def spy(trainer, values, step=None, epoch=None):
        histograms.append((sorted(values), step, epoch))
        return real(trainer, values, step=step, epoch=epoch)

    monkeypatch.setattr(susceptibility, "log_histograms", spy)

    def run(ckpt_path=None, callbacks=()):
        histograms.clear()
        return _masked_run(tmp_path, MaskedData, ckpt_path, callbacks), list(histograms)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "last", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    straight, straight_histograms = run(callbacks=[ckpt])
    resumed, resumed_histograms = run(ckpt_path=tmp_path / "last" / "step=6.ckpt")
    keys = ["memorization/weights_clean", "memorization/weights_noisy"]
    assert straight_histograms == resumed_histograms == [(keys, 6 * epoch + 5, epoch) for epoch in range(3)]

    def weight_means(monitor):
        return {r["epoch"]: {k: v for k, v in r.items() if "weight_mean" in k} for r in monitor.logged_history}

    assert all(len(means) == 2 for means in weight_means(straight).values())
    assert weight_means(resumed).keys() == weight_means(straight).keys() == {0, 1, 2}
    for epoch, means in weight_means(straight).items():
        assert weight_means(resumed)[epoch] == pytest.approx(means, rel=1e-6), epoch


def test_one_monitors_probe_is_not_taken_for_the_training_forward_by_another(tmp_path):
    """Two monitors (two prefixes), probing with batches of the training batch's size: the second probes in its
    on_train_batch_start after the first has armed its hook for the batch, so without the probe marked as the
    library's own forward the first counted the probe's predictions as the training forward's. Both must log the
    accuracies of the training forwards themselves (recorded by the module)."""
    from resumable_data import MaskedData

    L.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = _Recording(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    first = SusceptibilityMonitor(batch_size=40, seed=5, prefix="first")
    second = SusceptibilityMonitor(batch_size=40, seed=6, prefix="second")
    dm = MaskedData()  # batches of 40
    _trainer(tmp_path, [first, second], epochs=3).fit(model, datamodule=dm)
    for epoch in range(3):  # the untrained model of epoch 0 predicts almost one class whatever its input
        noisy, clean, seen = _recorded_subset_accuracy(model.records[epoch], dm.noise_mask)
        assert seen == 240
        for monitor in (first, second):
            logged = monitor.logged_history[epoch]
            assert logged[f"{monitor.prefix}/train_acc_noisy"] == pytest.approx(noisy), (monitor.prefix, epoch)
            assert logged[f"{monitor.prefix}/train_acc_clean"] == pytest.approx(clean), (monitor.prefix, epoch)
