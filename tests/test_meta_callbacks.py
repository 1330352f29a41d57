"""MetaReweight in real Trainers: training, resume equivalence, DDP, refused strategies, bf16, the figure."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from resumable_data import MaskedData
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from two_optimizers import TwoOptimizers

from lightning_reweight import ReweightClassifier
from lightning_reweight.callbacks import MetaReweight
from lightning_reweight.callbacks._plots import log_weight_function
from lightning_reweight.meta import L2RW, MetaProblem, MetaWeightNet
from lightning_reweight.models import MLP

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available.*")


def loaders(n: int = 240, batch: int = 40, meta: int = 90, meta_batch: int = 30) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    noisy = torch.where(torch.rand(n, generator=g) < 0.4, torch.randint(0, 4, (n,), generator=g), y)
    train = DataLoader(TensorDataset(x, noisy, torch.arange(n)), batch_size=batch, shuffle=False)
    meta_loader = DataLoader(TensorDataset(x[:meta], y[:meta]), batch_size=meta_batch, shuffle=True)
    return train, meta_loader


def module(seed: int = 0) -> ReweightClassifier:
    torch.manual_seed(seed)
    return ReweightClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05, momentum=0.9)


def trainer(epochs: int, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kw)


def flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_trains_with_warmup_and_counts_meta_steps(strategy):
    train, meta = loaders()
    model = module()
    cb = MetaReweight(strategy(), meta_dataloader=meta, hypergrad="finite_diff", warmup_epochs=1)
    trainer(3, [cb]).fit(model, train)
    assert cb.state_dict()["meta_steps"] == 2 * len(train)  # no meta step in the warm-up epoch
    w = model.last_sample_weights
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert not torch.allclose(w, torch.ones_like(w))  # weights are not uniform after warm-up
    if strategy is L2RW:
        assert torch.isclose(w.sum(), torch.tensor(float(len(w)))) or w.sum() == 0  # mean scale
    assert "MetaReweight" not in model.weightings  # detached at teardown


def test_meta_interval_weights_with_current_meta_net_between_meta_steps():
    train, meta = loaders()
    model = module()
    cb = MetaReweight(MetaWeightNet(hidden=8), meta_dataloader=meta, hypergrad="forward", meta_interval=3)
    fit = trainer(1, [cb])
    meta_at, meta_weights = [], cb.strategy.meta_weights

    def spy(*args, **kwargs):
        meta_at.append(fit.global_step)
        return meta_weights(*args, **kwargs)

    cb.strategy.meta_weights = spy
    fit.fit(model, train)
    assert meta_at == list(range(0, len(train), 3))  # optimizer steps 0, 3, 6, ...
    assert cb.state_dict()["meta_steps"] == len(meta_at)
    # the last step is not a meta step: its weights are V(l) of the current meta-net, in (0, 1)
    x, y, _ = list(train)[-1]
    assert (len(train) - 1) % 3 != 0
    assert model.last_sample_weights.shape == y.shape
    assert ((model.last_sample_weights > 0) & (model.last_sample_weights < 1)).all()


@pytest.mark.parametrize("hypergrad", ["forward", "finite_diff"])
def test_callback_weights_are_l2rw_of_the_training_forward_itself_with_dropout(hypergrad, monkeypatch):
    """End to end: the weights MetaReweight hands to ``reweight`` are L2RW's rule on per-sample gradients of the
    training forward (its dropout masks), dotted with the meta gradient of the meta batch it drew (per-sample
    gradients one by one, in a fresh copy of the model). The alignment was prepared before the training forward."""
    train, meta = loaders()
    prepare = MetaProblem.prepare
    prepared: list[bool] = []

    def spy(problem):
        prepared.append(getattr(model, "last_sample_weights", None) is None)  # no training forward yet
        prepare(problem)

    monkeypatch.setattr(MetaProblem, "prepare", spy)
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(64, 4, hidden=(16,), dropout=0.5), num_classes=4, lr=0.05, momentum=0.9)
    seen: dict = {}

    class Before(L.Callback):  # runs before MetaReweight's own batch-start hook
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.update(state={k: v.clone() for k, v in pl_module.state_dict().items()}, batch=batch,
                        rng=torch.get_rng_state())

    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad=hypergrad)
    draw = cb._next_meta_batch
    cb._next_meta_batch = lambda t: seen.setdefault("meta", draw(t))
    trainer(1, [Before(), cb], max_steps=1).fit(model, train)
    assert prepared == [True]

    ref = ReweightClassifier(MLP(64, 4, hidden=(16,), dropout=0.5), num_classes=4).train()
    ref.load_state_dict(seen["state"])
    params = list(ref.parameters())
    torch.set_rng_state(seen["rng"])
    meta_grad = torch.autograd.grad(ref.per_sample_loss(seen["meta"]).mean(), params)
    torch.set_rng_state(seen["rng"])  # the training forward's masks
    losses = ref.per_sample_loss(seen["batch"])
    u = torch.stack([
        sum((a.double() * b.double()).sum() for a, b in zip(torch.autograd.grad(li, params, retain_graph=True),
                                                            meta_grad))
        for li in losses
    ]).clamp_min(0)
    expected = (len(u) * u / u.sum()).float()
    assert u.sum() > 0 and (u == 0).any()
    if hypergrad == "forward":
        assert torch.allclose(model.last_sample_weights, expected, rtol=1e-4, atol=1e-5)
    else:  # a one-sided difference (ReLU kinks within the step): the engine's finite-difference tolerances
        w = model.last_sample_weights
        assert F.cosine_similarity(w.double(), expected.double(), dim=0) > 0.999
        assert float((w - expected).norm() / expected.norm()) < 0.05


class RebuiltBatchClassifier(ReweightClassifier):
    """Hands ``reweight`` a new batch object (as an augmenting training_step would): the early alignment is unused."""

    def training_step(self, batch, batch_idx):
        batch = tuple(batch)
        return self.reweight(self.per_sample_loss(batch), batch)


def test_rebuilt_batch_falls_back_to_the_late_alignment_with_one_meta_batch_per_step():
    """When training_step reweights another batch object than the hook prepared, the alignment is computed afresh
    on the meta batch already drawn: the same training as the usual module (one meta batch per step, not two)."""
    runs = []
    for cls in (ReweightClassifier, RebuiltBatchClassifier):
        train, meta = loaders()
        torch.manual_seed(0)
        model = cls(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05, momentum=0.9)
        cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="finite_diff")
        trainer(1, [cb]).fit(model, train)
        runs.append((model, cb.state_dict()))
    (usual, usual_state), (rebuilt, rebuilt_state) = runs
    assert rebuilt_state["meta_steps"] == usual_state["meta_steps"] == len(loaders()[0])
    assert (rebuilt_state["meta_epoch"], rebuilt_state["meta_pos"]) == (usual_state["meta_epoch"],
                                                                        usual_state["meta_pos"])
    torch.testing.assert_close(flat(rebuilt), flat(usual), rtol=1e-6, atol=1e-7)


def test_virtual_step_uses_the_optimizers_current_lr():
    train, meta = loaders()

    class SetLR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 0.01 * (trainer.current_epoch + 1)

    cb = MetaReweight(MetaWeightNet(hidden=8), meta_dataloader=meta, hypergrad="forward")
    fit = trainer(2, [SetLR(), cb])
    step, lrs = cb.strategy.meta_weights, []

    def spy(problem, lr):
        lrs.append((fit.current_epoch, lr))
        return step(problem, lr)

    cb.strategy.meta_weights = spy
    fit.fit(module(), train)
    assert lrs == [(e, pytest.approx(0.01 * (e + 1))) for e in (0, 1) for _ in range(len(train))]


def test_meta_loader_reshuffled_every_meta_epoch():
    """Three meta batches per pass over the meta set: the second pass is a new order of the same samples."""
    train, meta = loaders()
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="forward")
    draw, batches = cb._next_meta_batch, []

    def spy(t):
        batches.append(draw(t))
        return batches[-1]

    cb._next_meta_batch = spy
    trainer(1, [cb]).fit(module(), train)
    first, second = (torch.cat([b[0] for b in batches[k : k + 3]]) for k in (0, 3))
    assert len(batches) == len(train) == 6
    assert not torch.equal(first, second)
    assert torch.equal(first.flatten().sort().values, second.flatten().sort().values)  # the same samples


class NoisyData(L.LightningDataModule):
    """The test loaders behind a datamodule that knows a noise mask (any boolean mask will do here)."""

    def __init__(self) -> None:
        super().__init__()
        self._train, self._meta = loaders()
        self.train_dataset = self._train.dataset
        self.noise_mask = torch.arange(len(self.train_dataset)) % 3 == 0

    def train_dataloader(self) -> DataLoader:
        return self._train

    def meta_dataloader(self) -> DataLoader:
        return self._meta


def pairwise_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties one half, over all pairs."""
    pos, neg = scores[positive], scores[~positive]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_weight_aurocs_and_sample_history_match_the_weights_handed_to_reweight(strategy):
    """Per-epoch weight AUROC, the per-sample history and its logged AUROC, recomputed from the weights the
    module received (a second callback records them with the batch's indices)."""
    dm = NoisyData()
    epochs: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    class Recorder(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epochs.append([])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch >= 1:  # after warm-up
                epochs[-1].append((pl_module.last_sample_weights.detach().clone(), batch[2].clone()))

    cb = MetaReweight(strategy(), hypergrad="finite_diff", warmup_epochs=1)
    fit = trainer(3, [cb, Recorder()], limit_train_batches=4)  # samples 160-239 are never weighted
    fit.fit(module(), datamodule=dm)
    clean = ~dm.noise_mask
    per_epoch = [pairwise_auroc(torch.cat([w for w, _ in e]), clean[torch.cat([i for _, i in e])]) for e in epochs[1:]]
    assert cb.auroc_history == pytest.approx(per_epoch, abs=1e-9)

    n = len(dm.train_dataset)
    visits, pct, wsum, pos = (torch.zeros(n, dtype=torch.float64) for _ in range(4))
    for w, idx in (pair for e in epochs for pair in e):
        for k, (i, wi) in enumerate(zip(idx.tolist(), w.double().tolist())):
            visits[i] += 1
            pct[i] += (float((w < w[k]).sum()) + float((w == w[k]).sum()) / 2) / len(w)
            wsum[i] += wi
            pos[i] += wi > 0
    scores = cb.sample_scores()
    assert torch.equal(scores["visits"], visits)
    assert bool((visits[:160] == 2).all() and (visits[160:] == 0).all())
    torch.testing.assert_close(scores["percentile"], pct / visits, equal_nan=True)  # nan where never weighted
    torch.testing.assert_close(scores["mean_weight"], wsum / visits, equal_nan=True)
    torch.testing.assert_close(scores["positive_share"], pos / visits, equal_nan=True)
    seen = visits > 0
    expected = pairwise_auroc((pct / visits)[seen], clean[seen])
    assert cb.sample_auroc_history[-1] == pytest.approx(expected, abs=1e-9)
    assert float(fit.callback_metrics["meta/sample_auroc"]) == pytest.approx(expected, abs=1e-6)
    assert cb.benchmark_metrics()["sample_auroc_positive_share"] == pytest.approx(
        pairwise_auroc((pos / visits)[seen], clean[seen]), abs=1e-9
    )


class ManualClassifier(ReweightClassifier):
    """The manual-optimization route: training_step steps the optimizer itself around ``self.reweight``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.reweight(self.per_sample_loss(batch), batch)
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_manual_optimization_equals_automatic(strategy):
    """Same data, init and meta-net: a module that steps its optimizer by hand (automatic_optimization=False)
    ends with the same parameters and meta-net as the usual automatic route (a second route to the same run)."""
    runs = []
    for manual in (False, True):
        train, meta = loaders()
        torch.manual_seed(0)
        cls = ManualClassifier if manual else ReweightClassifier
        model = cls(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05, momentum=0.9)
        torch.manual_seed(3)
        cb = MetaReweight(strategy(), meta_dataloader=meta, hypergrad="finite_diff", warmup_epochs=1)
        trainer(3, [cb]).fit(model, train)
        runs.append((model, cb))
    (auto, auto_cb), (man, man_cb) = runs
    assert man_cb.state_dict()["meta_steps"] == auto_cb.state_dict()["meta_steps"] == 2 * len(loaders()[0])
    torch.testing.assert_close(flat(man), flat(auto), rtol=1e-6, atol=1e-7)
    if strategy is MetaWeightNet:
        torch.testing.assert_close(flat(man_cb.strategy), flat(auto_cb.strategy), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(flat(man), flat(module()))  # it trained


def textbook_phi_gradient(model: nn.Module, mwn: MetaWeightNet, x, y, mx, my, lr: float) -> list[torch.Tensor]:
    """MW-Net's meta gradient written out on a copy: virtual SGD step on mean V(l) l, meta CE, backward to phi."""
    m = copy.deepcopy(model)
    names = [n for n, _ in m.named_parameters()]
    params = list(m.parameters())
    losses = F.cross_entropy(m(x), y, reduction="none")
    grads = torch.autograd.grad((mwn.weight_net(losses.detach()) * losses).mean(), params, create_graph=True)
    virtual = {n: p - lr * g for n, p, g in zip(names, params, grads)}
    meta = F.cross_entropy(functional_call(m, virtual, (mx,)), my)
    return list(torch.autograd.grad(meta, list(mwn.weight_net.parameters())))


@pytest.mark.parametrize("delayed", [True, False])
def test_delayed_mwnet_is_the_hand_written_delayed_step(delayed):
    """``delayed=True``: each step weights with V(l; phi_t), steps theta with that gradient and updates phi by the
    textbook meta gradient of the virtual step theta - lr * (that gradient), all written out by hand here; the
    paper's order (``delayed=False``) weights with phi_{t+1} and ends elsewhere."""
    train, _ = loaders()
    g = torch.Generator().manual_seed(4)
    mx, my = torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    meta = DataLoader(TensorDataset(mx, my), batch_size=30)  # one fixed meta batch
    model, ref = module(), module()
    torch.manual_seed(3)
    init = MetaWeightNet(hidden=8).state_dict()
    mwn, ref_mwn = (MetaWeightNet(hidden=8, meta_lr=0.05, delayed=d) for d in (delayed, True))
    mwn.load_state_dict(init)
    ref_mwn.load_state_dict(init)
    cb = MetaReweight(mwn, meta_dataloader=meta, hypergrad="forward")
    trainer(1, [cb], limit_train_batches=3).fit(model, train)

    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for (x, y, _), _step in zip(train, range(3)):
        flat_x = x.reshape(len(x), -1)
        losses = F.cross_entropy(ref(flat_x), y, reduction="none")
        opt.zero_grad()
        (ref_mwn.weight_net(losses.detach()).detach() * losses).mean().backward()
        for p, gp in zip(ref_mwn.weight_net.parameters(), textbook_phi_gradient(ref, ref_mwn, flat_x, y, mx, my, 0.05)):
            p.grad = gp
        ref_mwn.meta_opt.step()
        opt.step()
    assert cb.state_dict()["meta_steps"] == 3
    if delayed:
        torch.testing.assert_close(flat(cb.strategy), flat(ref_mwn), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat(model), flat(ref), rtol=1e-5, atol=1e-6)
    else:
        assert (flat(model) - flat(ref)).abs().max() > 1e-4


def test_delayed_mwnet_refuses_gradient_accumulation():
    train, meta = loaders()
    cb = MetaReweight(MetaWeightNet(hidden=8, delayed=True), meta_dataloader=meta)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer(1, [cb], accumulate_grad_batches=2).fit(module(), train)


def test_delayed_mwnet_refuses_accumulation_a_scheduler_turns_on_later():
    """GradientAccumulationScheduler({1: 2}) raises accumulate_grad_batches at epoch 1's start, after setup's check:
    the first batch of epoch 1 refuses it (before: every other meta update silently dropped)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    train, meta = loaders()
    cb = MetaReweight(MetaWeightNet(hidden=8, delayed=True), meta_dataloader=meta)
    seen = []

    class Epochs(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(trainer.current_epoch)

    with pytest.raises(ValueError, match="accumulate_grad_batches=2 .epoch 1"):
        trainer(2, [GradientAccumulationScheduler({1: 2}), cb, Epochs()]).fit(module(), train)
    assert seen and set(seen) == {0}  # epoch 0 trained, no batch of epoch 1 did


@pytest.mark.parametrize("delayed", [False, True])
def test_resume_continues_identically(tmp_path, delayed):
    train, meta = loaders()
    straight_model = module()
    straight = MetaReweight(MetaWeightNet(hidden=8, delayed=delayed), meta_dataloader=meta, hypergrad="forward",
                            warmup_epochs=1)
    torch.manual_seed(1)
    straight.strategy.weight_net.load_state_dict(MetaWeightNet(hidden=8).weight_net.state_dict())
    init = {k: v.clone() for k, v in straight.strategy.state_dict().items()}
    trainer(4, [straight]).fit(straight_model, train)

    first_model = module()
    first = MetaReweight(MetaWeightNet(hidden=8, delayed=delayed), meta_dataloader=meta, hypergrad="forward",
                         warmup_epochs=1)
    first.strategy.load_state_dict(init)
    t = trainer(2, [first])
    t.fit(first_model, train)
    ckpt = tmp_path / "two.ckpt"
    t.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)  # plain tensors and Python values only
    assert any("MetaReweight" in k for k in state["callbacks"])

    resumed_model = module(seed=5)
    resumed = MetaReweight(MetaWeightNet(hidden=8, delayed=delayed), meta_dataloader=meta, hypergrad="forward",
                           warmup_epochs=1)
    trainer(4, [resumed]).fit(resumed_model, train, ckpt_path=ckpt)
    assert resumed.state_dict()["meta_steps"] == straight.state_dict()["meta_steps"]
    assert resumed.state_dict()["meta_pos"] == straight.state_dict()["meta_pos"]
    torch.testing.assert_close(flat(resumed.strategy), flat(straight.strategy), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat(resumed_model), flat(straight_model), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(flat(straight.strategy), torch.cat([v.reshape(-1) for v in init.values()]))
    resumed_scores, straight_scores = resumed.sample_scores(), straight.sample_scores()
    assert torch.equal(resumed_scores["visits"], straight_scores["visits"])  # epochs 1-3 of every sample
    assert bool((straight_scores["visits"] == 3).all())
    for key in ("percentile", "mean_weight"):
        torch.testing.assert_close(resumed_scores[key], straight_scores[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["l2rw", "mwn"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_the_datamodules_meta_loader_is_exact(tmp_path, strategy, num_workers):
    """ReweightDataModule's meta loader shuffles with its own generator (not the global RNG MetaReweight seeds):
    its state is checkpointed, so the resumed run draws the uninterrupted run's meta batches."""
    from lightning_reweight.data import DigitsDataModule

    def run(epochs, ckpt_path=None, save=None):
        L.seed_everything(0, verbose=False)
        dm = DigitsDataModule(noise_rate=0.4, batch_size=128, meta_per_class=5, meta_batch_size=20,
                              num_workers=num_workers)
        model = ReweightClassifier(MLP(64, 10, hidden=(16,)), num_classes=10, lr=0.05, momentum=0.9)
        meta = L2RW() if strategy == "l2rw" else MetaWeightNet(hidden=8)
        callback = MetaReweight(meta, hypergrad="finite_diff")
        t = trainer(epochs, [callback], deterministic=True, limit_val_batches=0)
        t.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        if save is not None:
            t.save_checkpoint(save)
        return model, callback

    straight_model, straight = run(3)
    run(1, save=tmp_path / "one.ckpt")
    state = torch.load(tmp_path / "one.ckpt", weights_only=True)
    (meta_state,) = [v for k, v in state["callbacks"].items() if k.startswith("MetaReweight")]
    assert meta_state["meta_pos"] not in (0, 3)  # the checkpoint falls inside a meta epoch (3 batches each)
    resumed_model, resumed = run(3, ckpt_path=tmp_path / "one.ckpt")
    assert resumed._meta_steps == straight._meta_steps and resumed._meta_epoch == straight._meta_epoch
    assert torch.equal(flat(resumed_model), flat(straight_model))
    if strategy == "mwn":
        assert torch.equal(flat(resumed.strategy), flat(straight.strategy))


@pytest.mark.ddp
def test_ddp_two_processes_identical_meta_net(tmp_path):
    script = Path(__file__).with_name("_ddp_meta_script.py")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = loaders()
    for name in ("mwn", "mwn_delayed", "l2rw"):
        r0, r1 = (torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert r0["steps"] == r1["steps"] == len(train) // 2  # both trained, each on half the batches
        torch.testing.assert_close(r0["model"], r1["model"])  # DDP kept the models in sync
        assert torch.isfinite(r0["weights"]).all() and not torch.allclose(r0["weights"], torch.ones_like(r0["weights"]))
        assert torch.equal(r0["meta"], r1["meta"])  # the meta-net is identical on both ranks
        # the per-sample history is the sum over ranks: both hold the same, each sample seen once (by one rank)
        for key in ("visits", "percentile", "mean_weight"):
            torch.testing.assert_close(r0["sample_scores"][key], r1["sample_scores"][key])
        assert bool((r0["sample_scores"]["visits"] == 1).all())
        weights = torch.zeros(len(train.dataset))
        for r in (r0, r1):
            weights[r["local_indices"]] = r["local_weights"]
        torch.testing.assert_close(r0["sample_scores"]["mean_weight"], weights.double())
        if name == "l2rw":  # with a noise mask: the epoch's weight AUROC over both ranks' samples, on both ranks
            noisy = torch.arange(len(train.dataset)) % 3 == 0
            assert r0["auroc"] == r1["auroc"] == [pytest.approx(pairwise_auroc(weights, ~noisy), abs=1e-6)]
    for name in ("mwn", "mwn_delayed"):
        mwn = torch.load(tmp_path / f"{name}_rank0.pt", weights_only=True)
        assert not torch.allclose(mwn["meta"], mwn["init"])  # ... and it was trained

    # the meta gradient is the mean of the ranks' own: recompute both in this process, average, take the SGD step
    ranks = [torch.load(tmp_path / f"mwn_sgd_step_rank{r}.pt", weights_only=True) for r in (0, 1)]
    local = []
    for rec in ranks:
        ref = module()
        ref.load_state_dict(rec["model_init"])
        mwn = MetaWeightNet(hidden=8, meta_optimizer="sgd", meta_lr=0.5)
        mwn.weight_net.load_state_dict(rec["meta_init"])
        problem = MetaProblem(ref, ref.per_sample_loss, lambda b, ref=ref: ref.per_sample_loss(b).mean(),
                              rec["batch"], rec["meta_batch"], hypergrad="forward")
        local.append(mwn.meta_gradient(problem, lr=0.05))
    assert not torch.equal(ranks[0]["batch"][2], ranks[1]["batch"][2])  # the ranks trained on different samples

    def stepped(grads):
        mwn = MetaWeightNet(hidden=8, meta_optimizer="sgd", meta_lr=0.5)
        mwn.weight_net.load_state_dict(ranks[0]["meta_init"])
        for p, g in zip(mwn.weight_net.parameters(), grads):
            p.grad = g
        mwn.meta_opt.step()
        return torch.cat([p.detach().reshape(-1) for p in mwn.weight_net.parameters()])

    after = torch.cat([v.reshape(-1) for v in ranks[0]["meta_after"].values()])
    mean = stepped([(a + b) / 2 for a, b in zip(*local)])
    total = stepped([a + b for a, b in zip(*local)])
    torch.testing.assert_close(after, mean, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(after, total, rtol=1e-4, atol=1e-6)  # the check tells a mean from a sum

    # L2RW: u_i = <grad l_i, mean of the ranks' meta gradients>, recomputed here by a per-sample loop
    for hypergrad in ("forward", "finite_diff"):
        recs = [torch.load(tmp_path / f"l2rw_{hypergrad}_step_rank{r}.pt", weights_only=True) for r in (0, 1)]
        ref = module()
        ref.load_state_dict(recs[0]["model_init"])
        params = list(ref.parameters())
        meta_grads = []
        for rec in recs:
            mx, my = rec["meta_batch"][:2]
            meta_grads.append(torch.autograd.grad(F.cross_entropy(ref(mx), my), params))
        mean_meta = [(a + b) / 2 for a, b in zip(*meta_grads)]
        for rank, rec in enumerate(recs):
            x, y = rec["batch"][:2]
            losses = F.cross_entropy(ref(x), y, reduction="none")

            def expected(meta_grad, losses=losses, params=params):
                u = torch.stack([sum((a * b).sum() for a, b in zip(
                    torch.autograd.grad(losses[i], params, retain_graph=True), meta_grad)) for i in range(len(losses))])
                w = u.clamp_min(0)
                return w * len(w) / w.sum()

            want, own = expected(mean_meta), expected(meta_grads[rank])
            got = rec["weights"]
            to_mean = float((got - want).norm() / want.norm())
            to_own = float((got - own).norm() / own.norm())
            assert to_mean < (1e-4 if hypergrad == "forward" else 1e-2), (hypergrad, rank, to_mean)
            assert to_own > 3 * to_mean, (hypergrad, rank, to_own, to_mean)  # the mean, not the rank's own

    # resumed after epoch 0 under DDP (from its end, or from its last batch): the uninterrupted run's parameters,
    # sample history (each rank resumes its own sums: the same additions in the same order), weight AUROCs and the
    # monitor's epoch values, on both ranks
    for rank in (0, 1):
        straight = torch.load(tmp_path / f"straight_rank{rank}.pt", weights_only=False)
        # one warm-up epoch, then two epochs of weights, each sample visited once per epoch
        assert bool((straight["visits"] == 2).all()) and len(straight["auroc"]) == 2 and len(straight["monitor"]) == 3
        assert {"memorization/train_acc_noisy", "memorization/weight_mean_clean"} <= set(straight["monitor"][1])
        for name in ("resumed", "lastbatch", "lastbatch1"):
            resumed = torch.load(tmp_path / f"{name}_rank{rank}.pt", weights_only=False)
            assert torch.equal(resumed["model"], straight["model"])
            assert torch.equal(resumed["visits"], straight["visits"])
            assert torch.equal(resumed["percentile"], straight["percentile"])
            for key in ("auroc", "sample_auroc", "monitor"):
                assert resumed[key] == straight[key], (name, key)
    # trainer.save_checkpoint after the fit (the run is over) still gathers: each rank's meta order and sums
    saved = torch.load(tmp_path / "postfit.ckpt", weights_only=False)["callbacks"]
    (meta_state,) = [v for k, v in saved.items() if k.startswith("MetaReweight")]
    assert meta_state["meta_generator_state"].shape[0] == 2 and meta_state["sample_history"]["per_rank"]
    sums = meta_state["sample_history"]["sums"]
    assert sums.shape[0] == 2 and float(sums[:, :, 0].sum()) == float(straight["visits"].sum())


def test_fsdp_and_deepspeed_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy

    train, meta = loaders()
    cb = MetaReweight(L2RW(), meta_dataloader=meta)
    fake = types.SimpleNamespace(strategy=FSDPStrategy(), datamodule=None)
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        cb.setup(fake, module(), "fit")  # type: ignore[arg-type]
    DeepSpeedLike = type("DeepSpeedStrategy", (), {})
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        cb.setup(types.SimpleNamespace(strategy=DeepSpeedLike(), datamodule=None), module(), "fit")  # type: ignore


def test_argument_errors():
    with pytest.raises(ValueError, match="meta_interval=1"):
        MetaReweight(L2RW(), meta_interval=2)
    with pytest.raises(ValueError, match="hypergrad"):
        MetaReweight(L2RW(), hypergrad="exact")
    train, meta = loaders()
    with pytest.raises(ValueError, match="meta_dataloader"):
        trainer(1, [MetaReweight(L2RW())]).fit(module(), train)
    with pytest.raises(TypeError, match=r"DataLoader\(dataset"):
        MetaReweight(L2RW(), meta_dataloader=meta.dataset)  # a dataset, not a loader


class ForgetfulClassifier(ReweightClassifier):
    """A training_step that reduces the losses itself instead of through ``self.reweight``."""

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()


class BatchlessClassifier(ReweightClassifier):
    """A training_step that calls ``self.reweight`` without the batch."""

    def training_step(self, batch, batch_idx):
        return self.reweight(self.per_sample_loss(batch))


def test_a_training_step_that_bypasses_reweight_is_reported():
    train, meta = loaders()
    torch.manual_seed(0)
    forgetful = ForgetfulClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    fit = trainer(3, [MetaReweight(L2RW(), meta_dataloader=meta)])
    with pytest.raises(RuntimeError, match=r"never called self.reweight\(losses, batch\) in epoch 0"):
        fit.fit(forgetful, train)
    assert fit.current_epoch == 0  # stopped after the first epoch
    batchless = BatchlessClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    with pytest.raises(ValueError, match=r"needs the training batch: return self.reweight\(losses, batch\)"):
        trainer(1, [MetaReweight(MetaWeightNet(), meta_dataloader=meta)]).fit(batchless, train)


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_a_reused_callback_starts_a_new_fit_afresh(strategy):
    """A callback fitted once and reused for a new (not resumed) fit on a larger training set trains exactly as a
    new callback holding the same strategy state: counters, meta-loader position and sample history restart."""
    small, meta = loaders(n=120)
    train, _ = loaders()
    used = MetaReweight(strategy(), meta_dataloader=meta)
    trainer(1, [used]).fit(module(), small)
    fresh = MetaReweight(copy.deepcopy(used.strategy), meta_dataloader=meta)
    runs = []
    for cb in (used, fresh):
        model = module(1)
        trainer(2, [cb]).fit(model, train)
        runs.append((flat(model), cb.state_dict()["meta_steps"], cb.sample_scores()["visits"]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] == 2 * len(train)
    assert torch.equal(runs[0][2], runs[1][2]) and runs[0][2].tolist() == [2.0] * len(train.dataset)


def test_a_continued_fit_on_the_same_trainer_keeps_the_run_state():
    train, meta = loaders()
    cb = MetaReweight(L2RW(), meta_dataloader=meta)
    model, fit = module(), trainer(1, [cb])
    fit.fit(model, train)
    fit.fit_loop.max_epochs = 2
    fit.fit(model, train)
    assert fit.current_epoch == 2
    assert cb.state_dict()["meta_steps"] == 2 * len(train)
    assert cb.sample_scores()["visits"].tolist() == [2.0] * len(train.dataset)


@pytest.mark.parametrize("delayed", [False, True])
def test_bf16_mixed_trains_and_meta_maths_in_fp32(delayed):
    train, meta = loaders()
    model = module()
    torch.manual_seed(0)
    cb = MetaReweight(MetaWeightNet(hidden=8, delayed=delayed), meta_dataloader=meta, hypergrad="finite_diff")
    init = flat(cb.strategy).clone()
    trainer(1, [cb], precision="bf16-mixed").fit(model, train)
    assert torch.isfinite(flat(cb.strategy)).all() and cb.state_dict()["meta_steps"] == len(train)
    assert not torch.allclose(flat(cb.strategy), init)  # the meta-net was updated (after the backward if delayed)
    # under autocast the engine recomputes the losses in fp32: the same alignment as without autocast
    x, y, _ = next(iter(train))
    mx, my = next(iter(meta))

    def ce(b):
        return F.cross_entropy(model(b[0]), b[1], reduction="none")

    ref = MetaProblem(model, ce, lambda b: ce(b).mean(), (x, y), (mx, my), hypergrad="finite_diff").alignment()
    fp32_losses = ce((x, y)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = ce((x, y))  # fp32 values from bf16 logits: not usable as l(theta) in a finite difference
        assert not torch.allclose(losses.detach().float(), fp32_losses, rtol=1e-4, atol=0)
        got = MetaProblem(model, ce, lambda b: ce(b).mean(), (x, y), (mx, my), hypergrad="finite_diff",
                          losses=losses).alignment()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_weight_function_figure_only_for_image_loggers():
    from lightning.pytorch.loggers import TensorBoardLogger

    calls = []

    class FakeTensorBoard(TensorBoardLogger):  # no tensorboard needed: only the experiment is used
        def __init__(self) -> None:
            pass

        @property
        def experiment(self):
            def add_figure(tag, fig, global_step, close):
                calls.append((tag, global_step))

            return types.SimpleNamespace(add_figure=add_figure)

    mwn = MetaWeightNet(hidden=8)
    fake = types.SimpleNamespace(loggers=[FakeTensorBoard()], current_epoch=0, global_step=7, is_global_zero=True)
    assert log_weight_function(fake, mwn)
    assert calls == [("meta/weight_function", 6)]  # at the epoch's last batch, where Lightning writes epoch-end values
    assert not log_weight_function(types.SimpleNamespace(loggers=[object()], current_epoch=0, global_step=0), mwn)


def test_histograms_and_figures_written_on_rank_zero_only():
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_reweight.loggers import log_histograms

    calls = []

    class FakeTensorBoard(TensorBoardLogger):  # only the experiment is used
        def __init__(self) -> None:
            pass

        @property
        def experiment(self):
            return types.SimpleNamespace(add_histogram=lambda tag, v, global_step: calls.append(tag),
                                         add_figure=lambda tag, fig, global_step, close: calls.append(tag))

    values = {"w": torch.rand(5)}
    for rank_zero in (False, True):
        fake = types.SimpleNamespace(loggers=[FakeTensorBoard()], current_epoch=0, global_step=3,
                                     is_global_zero=rank_zero)
        assert log_histograms(fake, values) == int(rank_zero)
        assert log_weight_function(fake, MetaWeightNet(hidden=4)) == rank_zero
    assert calls == ["w", "meta/weight_function"]


def test_a_failed_fit_leaves_no_weighting_or_hook_on_the_module():
    """teardown does not run after an exception: the callbacks must still detach what they attached, or a later
    plain fit of the same module would be silently reweighted."""
    from lightning_reweight.callbacks import DeferredReweighting, SusceptibilityMonitor

    train, meta = loaders()
    model = module()
    hooks_before = len(model._forward_hooks)

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert {"MetaReweight", "DeferredReweighting"} <= set(pl_module.weightings)
            raise RuntimeError("crash")

    callbacks = [MetaReweight(L2RW(), meta_dataloader=meta), DeferredReweighting(0, cls_num_list=[60, 60, 60, 60]),
                 SusceptibilityMonitor(batch_size=16, num_classes=4), Crash()]
    with pytest.raises(RuntimeError, match="crash"):
        trainer(2, callbacks).fit(model, train)
    assert dict(model.weightings) == {}
    assert len(model._forward_hooks) == hooks_before


def test_mid_epoch_resume_keeps_the_epochs_weight_records(tmp_path):
    """A mid-epoch checkpoint carries the epoch's weights seen so far: with a loader that resumes its position, the
    resumed epoch's meta/weight_auroc equals the uninterrupted run's (before: only the batches after the resume)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        model = module()
        callback = MetaReweight(L2RW(), hypergrad="forward")
        L.Trainer(max_epochs=3, accelerator="cpu", devices=1, callbacks=[callback, *callbacks], logger=False,
                  enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                  deterministic=True).fit(model, datamodule=MaskedData(), ckpt_path=ckpt_path)
        return model, callback

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="{step}")
    straight_model, straight = run(callbacks=[ckpt])
    resumed_model, resumed = run(ckpt_path=tmp_path / "step=8.ckpt")  # epoch 1 (6 batches), after its 2nd batch
    assert torch.equal(flat(resumed_model), flat(straight_model))
    assert len(straight.auroc_history) == 3 and 0.5 < straight.auroc_history[1] < 1.0
    assert resumed.auroc_history == straight.auroc_history


def test_resume_from_an_epochs_last_batch_logs_that_epochs_aurocs(tmp_path):
    """A step checkpoint at an epoch's last batch (6 batches per epoch, saved after step 6): Lightning resumes into
    epoch 1 without epoch 0's end hook. Epoch 0's weight and sample AUROCs must still be computed (from the
    checkpoint's records) and logged at the uninterrupted run's step, with the uninterrupted run's values."""
    import csv

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    def run(name, ckpt_path=None, callbacks=()):
        callback = MetaReweight(L2RW(), hypergrad="forward")
        L.Trainer(max_epochs=2, accelerator="cpu", devices=1, callbacks=[callback, *callbacks],
                  logger=CSVLogger(tmp_path, name=name), enable_checkpointing=bool(callbacks),
                  enable_progress_bar=False, enable_model_summary=False, deterministic=True).fit(
            module(), datamodule=MaskedData(), ckpt_path=ckpt_path)
        with open(tmp_path / name / "version_0" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("meta/weight_auroc")]
        return callback, [(int(r["epoch"]), int(r["step"]), float(r["meta/weight_auroc"])) for r in rows]

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    straight, straight_rows = run("straight", callbacks=[ckpt])
    resumed, resumed_rows = run("resumed", ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert len(straight.auroc_history) == 2 and len(straight.sample_auroc_history) == 2
    assert resumed.auroc_history == straight.auroc_history
    assert resumed.sample_auroc_history == straight.sample_auroc_history
    assert [(e, s) for e, s, _ in resumed_rows] == [(e, s) for e, s, _ in straight_rows] == [(0, 5), (1, 11)]
    assert [v for *_, v in resumed_rows] == pytest.approx([v for *_, v in straight_rows], rel=1e-6)


class _ValidatedMaskedData(MaskedData):
    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:60], self.noisy[:60]), batch_size=30)


@pytest.mark.parametrize("case", ["last_batch", "final_last_batch", "validation_end", "epoch_end_max_steps"])
def test_every_kind_of_checkpoint_resumes_to_the_straight_runs_epoch_end_values(tmp_path, case):
    """Each epoch's end values (weight AUROC, sample AUROC, MW-Net figure with its epoch and step) once, as in the
    uninterrupted run, whatever the checkpoint: at an epoch's last batch (Lightning skips that epoch's end hook
    after the resume), at the last batch of the final epoch (no batch runs after the resume), at validation's end
    (before the epoch's end hook, which Lightning runs on resume), and at an epoch's end in a max_steps run
    (Lightning runs that epoch's end hook again on resume)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    limits = {"max_epochs": -1, "max_steps": 18} if case == "epoch_end_max_steps" else {"max_epochs": 3}
    data = _ValidatedMaskedData if case == "validation_end" else MaskedData
    ckpt = {
        "last_batch": ("step=6.ckpt", {"every_n_train_steps": 6}),
        "final_last_batch": ("step=18.ckpt", {"every_n_train_steps": 6}),
        "validation_end": ("step=6.ckpt", {"save_on_train_epoch_end": False}),
        "epoch_end_max_steps": ("step=6.ckpt", {"every_n_epochs": 1}),
    }[case]

    def run(ckpt_path=None, callbacks=()):
        callback = MetaReweight(MetaWeightNet(hidden=4), plot_every_n_epochs=1)
        drawn = []
        callback._log_weight_function = lambda trainer, epoch, step: drawn.append((epoch, step))
        L.Trainer(**limits, accelerator="cpu", devices=1, callbacks=[callback, *callbacks], logger=False,
                  enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0).fit(module(), datamodule=data(), ckpt_path=ckpt_path)
        return callback, drawn

    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{step}", **ckpt[1])
    straight, straight_drawn = run(callbacks=[saver])
    resumed, resumed_drawn = run(ckpt_path=tmp_path / ckpt[0])
    assert straight_drawn == [(0, 5), (1, 11), (2, 17)]
    drawn_before = {"final_last_batch": 2, "epoch_end_max_steps": 1}.get(case, 0)  # figures the checkpoint follows
    assert resumed_drawn == straight_drawn[drawn_before:]
    assert len(straight.auroc_history) == len(straight.sample_auroc_history) == 3
    assert resumed.auroc_history == pytest.approx(straight.auroc_history, rel=1e-6)
    assert resumed.sample_auroc_history == pytest.approx(straight.sample_auroc_history, rel=1e-6)


def test_warmup_beyond_a_max_steps_run_is_warned_about():
    """The warm-up check needs the epoch length, known from on_train_start: max_steps=12 is two epochs of 6."""
    with pytest.warns(UserWarning, match=r"warmup_epochs=5 is never reached with max_steps=12 .6 steps per epoch"):
        L.Trainer(max_epochs=-1, max_steps=12, accelerator="cpu", devices=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[MetaReweight(L2RW(), warmup_epochs=5)]).fit(module(), datamodule=MaskedData())


def test_a_compiled_model_trains_like_the_eager_one_and_second_order_is_refused():
    """torch.compile'd code frees its graph at the first backward (donated buffers), so MW-Net's virtual step cannot
    backpropagate through the training forward's graph again: the engine recomputes the losses for a compiled model
    (before: RuntimeError at the first meta step). The meta-net then ends where the eager run's does;
    second_order, a double backward, is refused with a clear error."""
    train, meta = loaders()

    def run(compiled, hypergrad="finite_diff"):
        model = module()
        if compiled:
            model.backbone = torch.compile(model.backbone, backend="aot_eager")  # AOTAutograd, no C compiler
        torch.manual_seed(0)
        cb = MetaReweight(MetaWeightNet(hidden=8), meta_dataloader=meta, hypergrad=hypergrad)
        trainer(1, [cb], limit_train_batches=3).fit(model, train)
        return cb

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    assert compiled._meta_steps == eager._meta_steps == 3
    torch.testing.assert_close(flat(compiled.strategy), flat(eager.strategy), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="second_order.*torch.compile"):
        run(True, "second_order")
    model = module()
    model.backbone = torch.compile(model.backbone, backend="aot_eager")
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="second_order", warmup_epochs=1)
    with pytest.raises(ValueError, match="MetaReweight.hypergrad='second_order'.*torch.compile"):  # before training
        trainer(2, [cb]).fit(model, train)
    assert cb._meta_steps == 0 and model.trainer.global_step == 0


def test_virtual_step_follows_the_optimizers_parameter_groups():
    """Backbone features at lr 0.01, classifier at 0.5, one layer left out of the optimizer: the meta problems the
    callback builds scale each parameter's virtual step by its group's lr over the first group's."""
    train, meta = loaders()
    seen = []

    class TwoGroups(ReweightClassifier):
        def configure_optimizers(self):
            features = list(self.backbone.features.parameters())
            head = list(self.backbone.classifier.parameters())
            return torch.optim.SGD([{"params": features[2:], "lr": 0.01}, {"params": head, "lr": 0.5}], lr=0.01)

    class Spy(L2RW):
        def meta_weights(self, problem, lr):
            seen.append((problem.lr_scale, lr))
            return super().meta_weights(problem, lr)

    torch.manual_seed(0)
    model = TwoGroups(MLP(64, 4, hidden=(16, 16)), num_classes=4)
    trainer(1, [MetaReweight(Spy(), meta_dataloader=meta)], limit_train_batches=2).fit(model, train)
    features = list(model.backbone.features.parameters())
    expected = [0.0 if any(p is q for q in features[:2]) else 50.0 if n.startswith("backbone.classifier") else 1.0
                for n, p in model.named_parameters()]
    assert len(seen) == 2 and seen[0][0] == expected and seen[0][1] == 0.01
    assert expected.count(0.0) == 2 and expected.count(50.0) == 2 and expected.count(1.0) == 2

    seen.clear()
    trainer(1, [MetaReweight(Spy(), meta_dataloader=meta)], limit_train_batches=1).fit(module(), train)
    assert seen[0][0] is None  # one group holding every parameter: the plain virtual step


def test_ranks_draw_different_meta_batches_from_a_loader_with_its_own_generator():
    """Under DDP each rank builds the datamodule's meta loader with the same seeded generator; ranks above 0
    reseed it (initial seed + 104729 * rank), so that the ranks' meta batches differ, and rank 0 keeps its order."""
    import types

    def loader():
        return DataLoader(TensorDataset(torch.arange(60.0)), batch_size=10, shuffle=True,
                          generator=torch.Generator().manual_seed(7))

    def first_batches(rank):
        callback = MetaReweight(L2RW(), meta_dataloader=loader())
        callback._meta_loader = callback._user_meta_loader
        fake = types.SimpleNamespace(global_rank=rank)
        return [callback._next_meta_batch(fake)[0].tolist() for _ in range(3)]

    rank0, rank1 = first_batches(0), first_batches(1)
    assert rank0 == [b[0].tolist() for b in loader()][:3]  # rank 0: the loader's own order
    g = torch.Generator().manual_seed(7 + 104729)
    expected = DataLoader(TensorDataset(torch.arange(60.0)), batch_size=10, shuffle=True, generator=g)
    assert rank1 == [b[0].tolist() for b in expected][:3] and rank1 != rank0


def test_missing_matplotlib_skips_the_figure_with_a_warning(monkeypatch):
    """An epoch-end figure must not end the run: without matplotlib the weighting function is skipped."""
    from lightning.pytorch.loggers import TensorBoardLogger

    class FakeTensorBoard(TensorBoardLogger):
        def __init__(self) -> None:
            pass

    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    fake = types.SimpleNamespace(loggers=[FakeTensorBoard()], current_epoch=0, global_step=7, is_global_zero=True)
    with pytest.warns(UserWarning, match=r"needs matplotlib.*training goes on"):
        assert log_weight_function(fake, MetaWeightNet(hidden=8)) is False


def test_clean_data_logs_no_undefined_auroc():
    """noise_rate 0: the mask is all False; an AUROC against one class is undefined, so none is logged (was nan)."""
    from lightning_reweight.data import DigitsDataModule

    dm = DigitsDataModule(noise_rate=0.0, batch_size=128, meta_per_class=5, meta_batch_size=20)
    callback = MetaReweight(L2RW())
    t = trainer(1, [callback], limit_train_batches=3, limit_val_batches=0)
    t.fit(module_for_digits(), datamodule=dm)
    assert callback.auroc_history == [] and callback.sample_auroc_history == []
    assert "meta/weight_auroc" not in t.callback_metrics and "meta/sample_auroc" not in t.callback_metrics


def module_for_digits():
    torch.manual_seed(0)
    return ReweightClassifier(MLP(64, 10, hidden=(16,)), num_classes=10, lr=0.05)


# ---------------------------------------------------------------------------- review of the callback as a user
@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_an_empty_or_one_shot_meta_loader_is_an_error(strategy):
    """A meta loader with no batch used to end every epoch silently (Lightning reads the StopIteration as the end
    of the training data); a one-shot iterator cannot be cycled."""
    train, meta = loaders()
    empty = DataLoader(meta.dataset, batch_size=len(meta.dataset) + 1, drop_last=True)
    fit = trainer(2, [MetaReweight(strategy(), meta_dataloader=empty)])
    with pytest.raises(RuntimeError, match="the meta loader yielded no batch"):
        fit.fit(module(), train)
    with pytest.raises(TypeError, match="re-iterable"):
        MetaReweight(strategy(), meta_dataloader=iter(meta))
    with pytest.raises(TypeError, match="re-iterable"):
        MetaReweight(strategy(), meta_dataloader=(b for b in meta))


def test_several_optimizers_are_refused():
    """The virtual step follows one optimizer's parameter groups; a second optimizer's parameters used to get
    lr scale 0 (silently wrong weights)."""
    train, meta = loaders()
    torch.manual_seed(0)
    model = TwoOptimizers(MLP(64, 4, hidden=(16,)), num_classes=4)
    with pytest.raises(ValueError, match="exactly one optimizer"):
        trainer(1, [MetaReweight(L2RW(), meta_dataloader=meta)]).fit(model, train)


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_a_closure_optimizer_is_refused(strategy):
    """Lightning re-runs training_step inside LBFGS's closure: every re-evaluation ran a meta step with a new meta
    batch (10 meta steps for 2 optimizer steps), silently."""

    class WithLBFGS(ReweightClassifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=5)

    train, meta = loaders()
    torch.manual_seed(0)
    model = WithLBFGS(MLP(64, 4, hidden=(16,)), num_classes=4)
    with pytest.raises(ValueError, match="needs a closure"):
        trainer(1, [MetaReweight(strategy(), meta_dataloader=meta)]).fit(model, train)


def test_delayed_meta_net_under_manual_accumulation_warns_and_counts_only_updates_run():
    """Manual optimization stepping every 2 batches: the first batch's delayed meta update is dropped (no optimizer
    step followed it) and the second one's virtual step uses both batches' gradient. It was silent, and meta_steps
    counted the dropped updates too."""

    class Accumulating(ReweightClassifier):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(self.reweight(self.per_sample_loss(batch), batch))
            if batch_idx % 2 == 1:
                opt.step()
                opt.zero_grad()

    train, meta = loaders()
    torch.manual_seed(0)
    model = Accumulating(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    cb = MetaReweight(MetaWeightNet(hidden=8, delayed=True), meta_dataloader=meta, hypergrad="forward")
    with pytest.warns(UserWarning, match="accumulates gradients over batches"):
        trainer(1, [cb]).fit(model, train)
    assert len(train) == 6 and cb.state_dict()["meta_steps"] == 3  # one meta update per optimizer step


class LrSpy(L2RW):
    def __init__(self):
        super().__init__()
        self.seen = []

    def meta_weights(self, problem, lr):
        self.seen.append((problem.lr_scale, lr))
        return super().meta_weights(problem, lr)


def test_a_first_parameter_group_at_lr_zero_does_not_move_and_the_others_keep_their_lr():
    """Features at lr 0, head at 0.1: the virtual step is the head's 0.1 and the features do not move (the first
    group's lr 0 used to make every scale 1 and the virtual lr 0)."""
    train, meta = loaders()

    class Frozen(ReweightClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.backbone.features.parameters(), "lr": 0.0},
                                    {"params": self.backbone.classifier.parameters(), "lr": 0.1}], lr=0.1)

    torch.manual_seed(0)
    model = Frozen(MLP(64, 4, hidden=(16,)), num_classes=4)
    spy = LrSpy()
    trainer(1, [MetaReweight(spy, meta_dataloader=meta)], limit_train_batches=1).fit(model, train)
    expected = [1.0 if n.startswith("backbone.classifier") else 0.0 for n, _ in model.named_parameters()]
    assert spy.seen == [(expected, 0.1)]


def test_the_lr_scales_follow_parameters_unfrozen_during_the_fit():
    """Features (lr 0.01) frozen in epoch 0 and unfrozen in epoch 1, head at lr 0.1: epoch 1's virtual step moves
    the features by a tenth of the head's step (a cache keyed on the lrs alone kept epoch 0's scales)."""
    train, meta = loaders()

    class Unfreezing(ReweightClassifier):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.backbone.classifier.parameters(), "lr": 0.1},
                                    {"params": self.backbone.features.parameters(), "lr": 0.01}], lr=0.1)

        def on_train_epoch_start(self):
            self.backbone.features.requires_grad_(self.current_epoch >= 1)

    torch.manual_seed(0)
    model = Unfreezing(MLP(64, 4, hidden=(16,)), num_classes=4)
    spy = LrSpy()
    trainer(2, [MetaReweight(spy, meta_dataloader=meta)], limit_train_batches=1).fit(model, train)
    head_only = [1.0 for n, _ in model.named_parameters() if n.startswith("backbone.classifier")]
    assert spy.seen[0] == (None, 0.1) and len(head_only) == 2  # only the head trains: one group, plain step
    features_first = [pytest.approx(0.1) if n.startswith("backbone.features") else 1.0
                      for n, _ in model.named_parameters()]
    assert spy.seen[1][0] == features_first and spy.seen[1][1] == 0.1


def test_a_warm_up_step_at_lr_zero_keeps_the_groups_ratios():
    """A per-step warm-up from lr 0 (LambdaLR): at step 0 every group's lr is 0, and every parameter's scale became
    1, the head-only optimizer's untrained features included; the ratios now come from the groups' initial lrs."""
    train, meta = loaders()

    class WarmUp(ReweightClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD([{"params": self.backbone.classifier.parameters(), "lr": 0.1},
                                   {"params": list(self.backbone.features.parameters())[2:], "lr": 0.01}], lr=0.1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    model = WarmUp(MLP(64, 4, hidden=(16, 16)), num_classes=4)
    spy = LrSpy()
    trainer(1, [MetaReweight(spy, meta_dataloader=meta)], limit_train_batches=2).fit(model, train)
    features = list(model.backbone.features.parameters())
    expected = [1.0 if n.startswith("backbone.classifier") else 0.0 if any(p is q for q in features[:2])
                else pytest.approx(0.1) for n, p in model.named_parameters()]
    assert [scale for scale, _ in spy.seen] == [expected, expected]  # step 0 (lr 0) as step 1 (lr 0.025)
    assert [lr for _, lr in spy.seen] == [0.0, pytest.approx(0.025)]

@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_true_precisions_give_the_meta_batch_the_models_dtype(precision):
    """The meta batch goes through the precision's ``convert_input`` as training batches do (it used to stay
    float32 and the meta forward failed on a float64 or bf16 model); finite differences at bf16 parameters warn."""
    train, meta = loaders()
    model = module()
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="forward")
    trainer(1, [cb], limit_train_batches=2, precision=precision).fit(model, train)
    assert cb.state_dict()["meta_steps"] == 2 and torch.isfinite(model.last_sample_weights).all()
    if precision == "bf16-true":
        with pytest.warns(UserWarning, match="hypergrad='forward'"):
            trainer(1, [MetaReweight(L2RW(), meta_dataloader=meta)], limit_train_batches=1,
                    precision=precision).fit(module(), train)


def test_the_meta_net_runs_in_fp32_under_a_callers_autocast():
    """MW-Net's weights and meta gradient are the same inside a bf16 autocast region (a bf16-mixed training step)
    as outside it (they used to be computed in bf16: 2% off)."""
    train, meta = loaders()
    model = module()
    x, y, _ = next(iter(train))
    mx, my = next(iter(meta))

    def ce(b):
        return F.cross_entropy(model(b[0]), b[1], reduction="none")

    mwn = MetaWeightNet(hidden=8)
    problem = MetaProblem(model, ce, lambda b: ce(b).mean(), (x, y), (mx, my), hypergrad="forward")
    losses = problem.detached_losses()
    ref_w, ref_g = mwn.weights(losses), mwn.meta_gradient(problem, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, g = mwn.weights(losses), mwn.meta_gradient(problem, 0.1)
    assert w.dtype == torch.float32 and torch.equal(w, ref_w)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


class SkipsFirstBatchOfEpochOne(ReweightClassifier):
    def on_train_batch_start(self, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 0:
            return -1  # Lightning: skip the rest of this epoch
        return None


def test_an_epoch_skipped_by_the_module_is_not_reported_as_a_missing_reweight_call():
    train, meta = loaders()
    torch.manual_seed(0)
    model = SkipsFirstBatchOfEpochOne(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    cb = MetaReweight(MetaWeightNet(hidden=8), meta_dataloader=meta)
    fit = trainer(3, [cb])
    fit.fit(model, train)
    assert fit.current_epoch == 3 and cb.state_dict()["meta_steps"] == 2 * len(train)


def test_sample_history_with_indices_of_a_larger_pool_says_what_to_do():
    train, meta = loaders()
    from lightning_reweight.data import IndexedDataset

    x, y, _ = train.dataset.tensors
    subset, _ = torch.utils.data.random_split(IndexedDataset(TensorDataset(x, y)), [160, 80],
                                              generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"IndexedDataset\(subset\)"):
        trainer(1, [MetaReweight(L2RW(), meta_dataloader=meta)]).fit(module(), DataLoader(subset, batch_size=40))


# ---------------------------------------------------------------------------- GPU-readiness review (CPU-checkable)
def test_meta_epochs_do_not_reseed_the_cuda_generators(monkeypatch):
    """torch.manual_seed at each meta epoch also reseeded every CUDA generator, outside the forked CPU state: on a
    GPU the training forward's dropout masks followed the meta epochs. Only the CPU generator is seeded now."""
    train, meta = loaders()
    model = module()  # (seeds torch itself)
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    cb = MetaReweight(L2RW(), meta_dataloader=meta)  # 3 meta batches: 6 training batches span 2 meta epochs
    trainer(1, [cb]).fit(model, train)
    assert cb._meta_epoch >= 1 and calls == []


def test_delayed_meta_update_unscales_the_gradients_of_a_fused_optimizer():
    """With a GradScaler, Lightning leaves the unscaling of a fused optimizer (Adam/SGD fused=True) to its step, so
    the gradients seen before the step still carry the loss scale; the delayed meta update divides it out."""
    import types

    class Recorder(MetaWeightNet):
        def meta_update(self, problem, lr, step_gradient=None):
            self.got = step_gradient

    strategy = Recorder(hidden=4, delayed=True)
    _, meta = loaders()
    cb = MetaReweight(strategy, meta_dataloader=meta)
    p = nn.Parameter(torch.ones(3))
    scaler = types.SimpleNamespace(get_scale=lambda: 1024.0)
    fake = types.SimpleNamespace(precision_plugin=types.SimpleNamespace(scaler=scaler))
    for fused, expected in ((True, torch.full((3,), 0.5)), (False, torch.full((3,), 512.0))):
        p.grad = torch.full((3,), 512.0)
        opt = torch.optim.SGD([p], lr=0.1)
        opt._step_supports_amp_scaling = fused  # what fused=True sets
        cb._pending = (types.SimpleNamespace(params=[p]), 0.1)
        cb.on_before_optimizer_step(fake, None, opt)
        assert torch.equal(strategy.got[0], expected)  # unfused: Lightning already unscaled them


# ---------------------------------------------------------------------------- losses that are not per_sample_loss
class AuxLossModule(ReweightClassifier):
    """training_step hands reweight() its losses plus an auxiliary term: not per_sample_loss(batch)."""

    def training_step(self, batch, batch_idx):
        losses = self.per_sample_loss(batch)
        return self.reweight(losses + 0.4 * losses.detach().flip(0), batch)


class DrawsInItsOwnHook(ReweightClassifier):
    """The module's own on_train_batch_start (run after the callbacks') draws a random number: the dropout masks
    of the training forward are then not those MetaReweight replays."""

    def on_train_batch_start(self, batch, batch_idx):
        torch.rand(1)


@pytest.mark.parametrize("make", [
    lambda: AuxLossModule(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05),
    lambda: DrawsInItsOwnHook(MLP(64, 4, hidden=(16,), dropout=0.5), num_classes=4, lr=0.05),
])
@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_losses_that_are_not_per_sample_loss_replayed_are_an_error(make, strategy):
    """L2RW's finite difference subtracted the replayed l(theta + h d) from other losses: every alignment came out
    negative, every weight 0, and the model silently never trained (MW-Net's meta-gradient was a mix of two
    losses)."""
    train, meta = loaders()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"not per_sample_loss\(batch\) replayed at the same parameters"):
        trainer(1, [MetaReweight(strategy(), meta_dataloader=meta)]).fit(make(), train)


class SlightlyScaledLosses(ReweightClassifier):
    """reweight() gets per_sample_loss(batch) * 1.001: a small systematic difference (like a little label
    smoothing), far above fp32 rounding."""

    def training_step(self, batch, batch_idx):
        return self.reweight(self.per_sample_loss(batch) * 1.001, batch)


def test_a_small_systematic_loss_difference_is_caught_in_fp32():
    """The fp32 tolerance is rounding-sized (1e-4 relative): a 1e-3 difference is an error, not let through."""
    train, meta = loaders()
    torch.manual_seed(0)
    model = SlightlyScaledLosses(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
    with pytest.raises(ValueError, match=r"not per_sample_loss\(batch\) replayed at the same parameters"):
        trainer(1, [MetaReweight(L2RW(), meta_dataloader=meta)]).fit(model, train)


@pytest.mark.parametrize("strategy", [L2RW, MetaWeightNet])
def test_a_forward_that_updates_its_own_buffers_is_replayed_from_the_pre_forward_buffers(strategy):
    """spectral_norm's power iteration updates a buffer the forward reads: the replays cloned the buffers after the
    training forward had updated them (one iteration later), so the replayed losses differed and the loss check
    refused a legitimate model."""
    train, meta = loaders()
    gaps = []

    class Gap(strategy):
        def meta_weights(self, problem, lr):
            gaps.append(float(problem.loss_gap(problem.losses)))
            return super().meta_weights(problem, lr)

    for seed in range(3):
        torch.manual_seed(seed)
        model = ReweightClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
        model.backbone.features[1] = nn.utils.parametrizations.spectral_norm(model.backbone.features[1])
        trainer(1, [MetaReweight(Gap(), meta_dataloader=meta, hypergrad="finite_diff")],
                limit_train_batches=2).fit(model, train)
    assert len(gaps) == 6 and max(gaps) < 1e-6  # the replay is the training forward, to rounding



def test_a_single_process_checkpoint_resumed_under_ddp_gives_other_ranks_their_own_meta_order():
    """A checkpoint with one generator state (single device, or saved before the states were gathered) was restored
    on every rank (all ranks then drew rank 0's meta batches), and its sample history loaded on every rank (visits
    counted once per rank). Rank 0 takes them; the other ranks reseed and start their history empty. After an
    exception (OnExceptionCheckpoint runs on the failing rank alone) no collective is attempted."""
    import types

    train, meta = loaders()
    meta = DataLoader(meta.dataset, batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(7))
    cb = MetaReweight(L2RW(), meta_dataloader=meta)
    trainer(1, [cb], limit_train_batches=2).fit(module(), train)
    saved = cb.state_dict()
    assert saved["meta_generator_state"].dim() == 1 and saved["sample_history"]["sums"][:, 0].sum() == 80
    for rank in (0, 1):
        resumed = MetaReweight(L2RW(), meta_dataloader=meta)
        resumed._trainer = types.SimpleNamespace(global_rank=rank, world_size=2)
        resumed.load_state_dict(saved)
        if rank == 0:
            assert torch.equal(resumed._meta_gen_state, saved["meta_generator_state"])
            assert torch.equal(resumed._history.sums, saved["sample_history"]["sums"])
        else:
            assert resumed._meta_gen_state is None and not resumed._history.sums.any()
    cb._trainer = types.SimpleNamespace(global_rank=1, world_size=2, interrupted=True)  # no strategy: no collective
    assert cb.state_dict()["meta_generator_state"].dim() == 1


def test_state_dicts_gather_under_ddp_except_after_an_exception(monkeypatch):
    """The callbacks' state dicts gather every rank's state under DDP, also after the fit (trainer.save_checkpoint
    on every rank: a first version gathered only while the run was going on, so such a checkpoint held rank 0's
    meta order and sample history alone), but not from the failing rank's OnExceptionCheckpoint."""
    import types

    from lightning_reweight.callbacks._records import collective_world

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for status, interrupted, world, want in (("running", False, 2, 2), ("finished", False, 2, 2),
                                             ("interrupted", True, 2, 1), ("running", False, 1, 1)):
        trainer = types.SimpleNamespace(world_size=world, interrupted=interrupted,
                                        state=types.SimpleNamespace(status=status))
        assert collective_world(trainer) == want, (status, world)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # no process group: nothing to gather
    assert collective_world(types.SimpleNamespace(world_size=2, interrupted=False)) == 1


def test_an_unfinished_epochs_records_go_to_the_ranks_that_resume_it():
    """Under DDP every rank's records of an unfinished epoch are saved (``per_rank``); a resume with as many
    processes gives each rank its own, one with another number gives rank 0 all of them (so an epoch whose batches
    were all done still ends with its exact values) and the other ranks an empty copy (they join the epoch-end
    reductions). Before, every rank took rank 0's records."""
    from lightning_reweight.callbacks import SusceptibilityMonitor
    from lightning_reweight.callbacks._records import records_for_rank

    def meta_records(weights, noisy):
        return {"epoch": 0, "end_step": 3, "batches": 3, "calls": 3, "weights": torch.tensor(weights),
                "noisy": torch.tensor(noisy)}

    def monitor_records(counts, weights, indices):
        return {"epoch": 0, "end_step": 3, "train_counts": torch.tensor(counts), "weights": torch.tensor(weights),
                "indices": torch.tensor(indices)}

    cases = (
        (lambda: MetaReweight(L2RW()), meta_records([0.5, 1.5], [True, False]), meta_records([2.0], [False]),
         meta_records([0.5, 1.5, 2.0], [True, False, False])),
        (lambda: SusceptibilityMonitor(num_classes=4), monitor_records([1, 2, 0, 1], [0.5, 1.5], [4, 7]),
         monitor_records([0, 1, 1, 0], [2.0], [3]), monitor_records([1, 3, 1, 1], [0.5, 1.5, 2.0], [4, 7, 3])),
    )
    for make, rank0, rank1, merged in cases:
        saved = {"per_rank": [rank0, rank1]}
        for world, rank, want in ((2, 0, rank0), (2, 1, rank1), (1, 0, merged), (3, 0, merged)):
            cb = make()
            records = records_for_rank(saved, rank, world, cb._merged_records, cb._empty_records)
            assert records.keys() == want.keys()
            for key, value in want.items():
                assert torch.equal(torch.as_tensor(records[key]), torch.as_tensor(value)), (world, rank, key)
        for rank in (1, 2):  # another number of processes: the other ranks get the same keys, no sample
            records = records_for_rank(saved, rank, 3, make()._merged_records, make()._empty_records)
            assert records["epoch"] == 0 and records["weights"].numel() == 0
            assert records.get("train_counts", torch.zeros(1)).sum() == 0
        single = records_for_rank(rank0, 1, 2, make()._merged_records, make()._empty_records)  # one process's
        assert single["weights"].numel() == 0 and records_for_rank(rank0, 0, 2, None, None) is rank0


def test_weight_function_figure_every_n_epochs():
    """plot_every_n_epochs=2 over 3 epochs: one figure, after the second epoch (epoch index 1)."""
    train, meta = loaders()
    cb = MetaReweight(MetaWeightNet(hidden=4), meta_dataloader=meta, plot_every_n_epochs=2)
    epochs = []
    cb._log_weight_function = lambda trainer, epoch, step: epochs.append((trainer.current_epoch, epoch))
    trainer(3, [cb], limit_train_batches=2).fit(module(), train)
    assert epochs == [(1, 1)]


# ---------------------------------------------------------------------------- from the fourth mutation audit
@pytest.mark.parametrize("saved_step", [6, 12])
def test_a_last_batch_resume_draws_the_figure_on_the_straight_runs_epochs(tmp_path, saved_step):
    """plot_every_n_epochs=2 over epochs 0-2 of 6 batches: the figure of epoch 1 only, at its last batch's step 11.
    A resume from the last batch of epoch 0 (step 6) or of epoch 1 (step 12) closes that epoch at train start, when
    the trainer's epoch is already the next one: the cadence must follow the closed epoch (a figure for epoch 0, or
    none for epoch 1, came from testing the trainer's epoch)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        callback = MetaReweight(MetaWeightNet(hidden=4), plot_every_n_epochs=2)
        drawn = []
        callback._log_weight_function = lambda trainer, epoch, step: drawn.append((epoch, step))
        L.Trainer(max_epochs=3, accelerator="cpu", devices=1, callbacks=[callback, *callbacks], logger=False,
                  enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False).fit(
            module(), datamodule=MaskedData(), ckpt_path=ckpt_path)
        return drawn

    straight = run(callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1,
                                              filename="{step}")])
    every_second = [(epoch, 6 * (epoch + 1) - 1) for epoch in range(3) if (epoch + 1) % 2 == 0]
    assert straight == every_second
    assert run(ckpt_path=tmp_path / f"step={saved_step}.ckpt") == every_second  # both checkpoints precede it


def test_a_one_epoch_warmup_the_run_never_ends_is_warned_about_and_one_it_ends_is_not():
    """warmup_epochs=1 with max_epochs=1: the whole run is warm-up (no meta step runs, checked), which the smallest
    warm-up must be warned about too; with max_epochs=2 meta steps do run, and there is no warning."""
    train, meta = loaders()
    cb = MetaReweight(L2RW(), meta_dataloader=meta, warmup_epochs=1)
    with pytest.warns(UserWarning, match=r"warmup_epochs=1 is never reached with max_epochs=1"):
        trainer(1, [cb]).fit(module(), train)
    assert cb._meta_steps == 0
    cb = MetaReweight(L2RW(), meta_dataloader=meta, warmup_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(2, [cb]).fit(module(), train)
    assert cb._meta_steps > 0
    assert not [w for w in caught if "never reached" in str(w.message)]


@pytest.mark.parametrize("how", ["submodule_compiled_in_place", "module_given_compiled"])
def test_second_order_is_refused_before_training_however_the_model_is_compiled(how):
    """Compiled code is run by a layer deep in the backbone compiled in place (``layer.compile()``), or by the whole
    LightningModule handed to the Trainer as ``torch.compile(module)`` (Lightning unwraps it and compiles its
    forward): second_order must be refused at fit start either way, before any training step (the engine's own
    refusal came only at the first meta step, after warm-up). Nothing is compiled: the error precedes any forward."""
    train, meta = loaders()
    model = module()
    if how == "submodule_compiled_in_place":
        layer = next(m for m in model.backbone.modules() if isinstance(m, nn.Linear))
        layer.compile(backend="aot_eager")
        given = model
    else:
        given = torch.compile(model, backend="aot_eager")
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="second_order", warmup_epochs=1)
    with pytest.raises(ValueError, match="MetaReweight.hypergrad='second_order'.*torch.compile"):
        trainer(2, [cb]).fit(given, train)
    assert cb._meta_steps == 0 and model.trainer.global_step == 0


class ForgetfulFromEpochOne(ReweightClassifier):
    """Reduces its losses through ``self.reweight`` in epoch 0 only, by itself afterwards."""

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 0:
            return super().training_step(batch, batch_idx)
        return self.per_sample_loss(batch).mean()


def test_a_last_batch_resume_reports_a_missing_reweight_call_in_the_next_epoch(tmp_path):
    """The per-epoch check that training_step called self.reweight counts the resumed epoch's batches and calls
    alone: resumed from epoch 0's last batch (whose 6 calls the checkpoint holds), an epoch 1 that never calls
    reweight must be reported as the uninterrupted run reports it (the closed epoch's calls must not hide it)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = ForgetfulFromEpochOne(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
        fit = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(callbacks),
                        callbacks=[MetaReweight(L2RW()), *callbacks], enable_progress_bar=False,
                        enable_model_summary=False)
        with pytest.raises(RuntimeError, match=r"never called self.reweight\(losses, batch\) in epoch 1"):
            fit.fit(model, datamodule=MaskedData(), ckpt_path=ckpt_path)
        return fit.global_step

    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    assert run(callbacks=[saver]) == 12  # epoch 1 trained, then reported
    assert run(ckpt_path=tmp_path / "step=6.ckpt") == 12


def test_a_validation_end_resume_reports_the_epochs_missing_reweight_calls(tmp_path):
    """A checkpoint at validation's end of an epoch whose training_step never called self.reweight: Lightning
    resumes straight into that epoch's end hook, with no batch after the resume; the checkpoint's batch count must
    still tell the check that the epoch trained, so the resume reports epoch 0 as the uninterrupted run does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = ForgetfulClassifier(MLP(64, 4, hidden=(16,)), num_classes=4, lr=0.05)
        fit = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(callbacks),
                        callbacks=[MetaReweight(L2RW()), *callbacks], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
        with pytest.raises(RuntimeError, match=r"never called self.reweight\(losses, batch\) in epoch 0"):
            fit.fit(model, datamodule=_ValidatedMaskedData(), ckpt_path=ckpt_path)

    run(callbacks=[ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=False, save_top_k=-1,
                                   filename="{step}")])
    run(ckpt_path=tmp_path / "step=6.ckpt")
