import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import ReweightClassifier
from lightning_reweight.callbacks import ClassWeighting, DeferredResampling, DeferredReweighting
from lightning_reweight.contract import WeightingContext
from lightning_reweight.losses import LDAMLoss
from lightning_reweight.models import MLP

COUNTS = [40, 16, 8]
BETA = 0.99


def cb_weights(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [r * len(counts) / sum(raw) for r in raw]


def make_data(counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(y.numel(), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y, torch.arange(y.numel()))


class TinyDataModule(L.LightningDataModule):
    """The attributes DRW/DRS read: train_class_counts, train_targets, train_sampler."""

    def __init__(self, counts=COUNTS, batch_size=16, num_workers=0):
        super().__init__()
        self.num_workers = num_workers
        self.dataset = make_data(counts)
        self.train_targets = self.dataset.tensors[1]
        self.train_class_counts = list(counts)
        self.train_sampler = None
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.train_sampler,
                          shuffle=self.train_sampler is None, num_workers=self.num_workers)


class Probe(L.Callback):
    """Records, per training batch: epoch, targets, the contract's weights, the criterion's weight buffer, loss."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        x, y, _ = self._batch
        with torch.no_grad():
            logits = pl_module(x)
        self.rows.append({
            "epoch": trainer.current_epoch, "y": y.clone(), "loss": float(loss.detach()), "logits": logits,
            "w": pl_module.sample_weights(torch.ones(y.numel()), self._batch).clone(),
            "crit_w": pl_module.criterion.weight.clone(),
        })


def trainer_for(tmp_path, epochs, callbacks, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **kw)


def model_for():
    torch.manual_seed(0)
    return ReweightClassifier(MLP(64, 3, hidden=(16,)), 3, criterion=LDAMLoss(COUNTS, s=5.0, reduction="none"),
                              lr=0.05)


def check_rows(rows, start, mode):
    expected = torch.tensor(cb_weights(COUNTS, BETA))
    for r in rows:
        y = r["y"]
        if r["epoch"] < start:
            assert torch.equal(r["w"], torch.ones(y.numel()))
            assert torch.equal(r["crit_w"], torch.ones(3))
            ref = LDAMLoss(COUNTS, s=5.0)(r["logits"], y)
        elif mode == "weighting":
            c = expected[y]
            assert torch.allclose(r["w"], c * y.numel() / c.sum(), rtol=1e-5)
            assert torch.equal(r["crit_w"], torch.ones(3))
            # PyTorch's weighted mean sum(c_y l) / sum(c_y)
            ref = LDAMLoss(COUNTS, s=5.0, weight=expected)(r["logits"], y)
        else:
            assert torch.equal(r["w"], torch.ones(y.numel()))
            assert torch.allclose(r["crit_w"], expected, rtol=1e-5)
            ref = LDAMLoss(COUNTS, s=5.0, weight=expected, reduction="sum")(r["logits"], y) / y.numel()
        assert r["loss"] == pytest.approx(float(ref), rel=1e-4)


@pytest.mark.parametrize("mode", ["weighting", "criterion"])
def test_drw_switches_exactly_at_start_epoch(tmp_path, mode):
    probe = Probe()
    drw = DeferredReweighting(start_epoch=2, beta=BETA, mode=mode)  # counts from the datamodule
    trainer_for(tmp_path, 4, [drw, probe], enable_checkpointing=False).fit(model_for(), datamodule=TinyDataModule())
    assert sorted({r["epoch"] for r in probe.rows}) == [0, 1, 2, 3]
    check_rows(probe.rows, 2, mode)


@pytest.mark.parametrize("mode", ["weighting", "criterion"])
def test_drw_resume_on_both_sides_of_start(tmp_path, mode):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer_for(tmp_path, 4, [DeferredReweighting(2, BETA, mode, COUNTS), ckpt]).fit(model_for(), TinyDataModule())
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert torch.equal(saved["state_dict"]["criterion.weight"], torch.ones(3))
    if mode == "criterion":
        after = torch.load(tmp_path / "ckpt" / "epoch=2.ckpt", weights_only=True)
        assert torch.allclose(after["state_dict"]["criterion.weight"], torch.tensor(cb_weights(COUNTS, BETA)))
    for name, first in (("epoch=0.ckpt", 1), ("epoch=2.ckpt", 3)):  # before / after start_epoch
        probe = Probe()
        trainer = trainer_for(tmp_path, 4, [DeferredReweighting(2, BETA, mode, COUNTS), probe],
                              enable_checkpointing=False)
        trainer.fit(model_for(), TinyDataModule(), ckpt_path=tmp_path / "ckpt" / name)
        assert min(r["epoch"] for r in probe.rows) == first
        check_rows(probe.rows, 2, mode)


def test_drw_errors():
    with pytest.raises(ValueError, match="cls_num_list"):
        DeferredReweighting(2, cls_num_list=[5, 0, 3])
    with pytest.raises(ValueError, match="mode"):
        DeferredReweighting(2, mode="loss")
    with pytest.raises(ValueError, match="beta"):
        DeferredReweighting(2, beta=1.0)
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3)  # CrossEntropyLoss without a weight tensor
    trainer = trainer_for(None, 1, [DeferredReweighting(0, mode="criterion", cls_num_list=COUNTS)])
    with pytest.raises(ValueError, match="criterion.weight"):
        trainer.fit(model, TinyDataModule())
    weighting = ClassWeighting(torch.ones(3))
    with pytest.raises(ValueError, match=r"return self.reweight\(losses, batch\)"):  # reweight called without batch
        weighting.sample_weights(torch.ones(2), WeightingContext(None))
    with pytest.raises(ValueError, match=r"batches must be \(inputs, targets"):
        weighting.sample_weights(torch.ones(2), WeightingContext(None, batch=torch.zeros(2, 4)))


class ClassCounter(L.Callback):
    def __init__(self):
        self.per_epoch = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        counts = self.per_epoch.setdefault(trainer.current_epoch, torch.zeros(3, dtype=torch.long))
        counts += torch.bincount(batch[1], minlength=3)


def drs_class_probabilities(counts, beta):
    w = cb_weights(counts, beta)
    mass = [n * wj for n, wj in zip(counts, w)]
    return torch.tensor([m / sum(mass) for m in mass])


def test_drs_changes_measured_class_frequencies(tmp_path):
    counts = [300, 60, 12]
    counter = ClassCounter()
    dm = TinyDataModule(counts, batch_size=31)
    trainer = trainer_for(tmp_path, 5, [DeferredResampling(start_epoch=2, beta=0.9999, seed=1), counter],
                          enable_checkpointing=False)
    trainer.fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), dm)
    for epoch in (0, 1):  # every sample exactly once: the natural counts
        assert counter.per_epoch[epoch].tolist() == counts
    drawn = sum(counter.per_epoch[e] for e in (2, 3, 4)).double()
    freq = drawn / drawn.sum()
    expected = drs_class_probabilities(counts, 0.9999)  # ~ uniform over classes
    sd = (expected * (1 - expected) / drawn.sum()).sqrt()
    assert bool(((freq - expected).abs() < 5 * sd).all()), (freq, expected)
    assert float(freq[2]) > 0.25  # the rare class (3% of the data) is drawn about a third of the time
    assert dm.train_sampler is None  # restored on teardown


def test_drs_resume_after_start_samples_balanced(tmp_path):
    counts = [300, 60, 12]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer_for(tmp_path, 3, [DeferredResampling(1, seed=3), ckpt]).fit(
        ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule(counts, 31))
    counter = ClassCounter()
    trainer = trainer_for(tmp_path, 5, [DeferredResampling(1), counter], enable_checkpointing=False)
    # a worker process makes the loader draw its indices as soon as Lightning builds the iterator, before any
    # epoch hook: the sampler must read the resumed epoch itself
    trainer.fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule(counts, 31, num_workers=1),
                ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert sorted(counter.per_epoch) == [3, 4]
    for e in (3, 4):  # the first epoch after the resume is already class-balanced
        assert int(counter.per_epoch[e][2]) > 60


def test_drs_needs_sampler_attribute(tmp_path):
    class NoSampler(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(make_data(), batch_size=8)

    with pytest.raises(ValueError, match="train_sampler"):
        trainer_for(tmp_path, 1, [DeferredResampling(0)]).fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3),
                                                              NoSampler())


class Indices(L.Callback):
    def __init__(self, out):
        self.out, self.seen = out, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(str(trainer.current_epoch), []).extend(batch[2].tolist())

    def on_train_end(self, trainer, pl_module):
        (drs,) = [c for c in trainer.callbacks if isinstance(c, DeferredResampling)]
        record = {**self.seen, "seed": drs.state_dict()["seed"]}
        Path(f"{self.out}.{trainer.global_rank}").write_text(json.dumps(record))


@pytest.mark.ddp
class RankSeeds(L.Callback):
    """Different global random states per rank before DRS draws its seed (as under torchrun without a common seed;
    ddp_fork hands every rank the parent's state, which would hide a missing broadcast)."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)


def test_drs_ddp_gloo_two_processes(tmp_path):
    out = str(tmp_path / "seen")
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[RankSeeds(), DeferredResampling(start_epoch=2, beta=0.9999), Indices(out)])
    trainer.fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule([300, 60, 12], 31))
    seen = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate([300, 60, 12])])
    for epoch in ("0", "1"):  # shards of one shared permutation: together every sample exactly once
        assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(372))
    # each rank's batches are its stride of the list the sampler draws for the epoch (no reshuffle by a wrapper
    # seeded with seed_everything): the list recomputed here from the broadcast seed
    seed = seen[0]["seed"]
    assert seen[1]["seed"] == seed
    weights = torch.tensor(cb_weights([300, 60, 12], 0.9999), dtype=torch.float64)[targets]
    for epoch in range(4):
        g = torch.Generator().manual_seed(seed + epoch)
        full = torch.randperm(372, generator=g) if epoch < 2 else torch.multinomial(weights, 372, True, generator=g)
        for rank in (0, 1):
            assert seen[rank][str(epoch)] == full[rank::2].tolist()
    drawn = torch.tensor(seen[0]["2"] + seen[0]["3"] + seen[1]["2"] + seen[1]["3"])
    freq = torch.bincount(targets[drawn], minlength=3).double() / drawn.numel()
    expected = drs_class_probabilities([300, 60, 12], 0.9999)
    sd = (expected * (1 - expected) / drawn.numel()).sqrt()
    assert bool(((freq - expected).abs() < 5 * sd).all()), (freq, expected)


class WrappingLoss(torch.nn.Module):
    """A criterion that wraps a base loss and is itself a weighting source (the shape of ABSGD's loss)."""

    def __init__(self, base_loss):
        super().__init__()
        self.base_loss = base_loss
        self.seen_weights = []

    def sample_weights(self, losses, context):
        self.seen_weights.append(self.base_loss.weight.clone())
        return torch.ones_like(losses)


def test_drw_criterion_mode_reaches_wrapped_base_loss(tmp_path):
    crit = WrappingLoss(LDAMLoss(COUNTS, s=5.0, reduction="none"))
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, criterion=crit, lr=0.05)
    epochs = []

    class Epochs(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            epochs.append(trainer.current_epoch)

    trainer_for(tmp_path, 3, [DeferredReweighting(1, BETA, "criterion", COUNTS), Epochs()],
                enable_checkpointing=False).fit(model, TinyDataModule())
    expected = torch.tensor(cb_weights(COUNTS, BETA))
    assert len(crit.seen_weights) == len(epochs) == 12
    for e, w in zip(epochs, crit.seen_weights):
        assert torch.allclose(w, expected if e >= 1 else torch.ones(3), rtol=1e-5)


def test_sampler_draws_anew_each_epoch_and_repeats_within_one():
    """A new order (or multinomial draw) every epoch, the same one for the same epoch (a resumed run)."""
    from lightning_reweight.samplers import DeferredWeightedSampler

    sampler = DeferredWeightedSampler(50, torch.linspace(1.0, 2.0, 50), start_epoch=2, seed=4)
    orders = {}
    for epoch in (0, 1, 2, 3):
        sampler.set_epoch(epoch)
        orders[epoch] = list(sampler)
        assert list(sampler) == orders[epoch]
    assert sorted(orders[0]) == list(range(50))  # before start_epoch: a permutation
    assert orders[0] != orders[1] and orders[2] != orders[3]


# ------------------------------------------------------------------------------ resume, reuse, misuse (review)
class EpochIndices(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())


def test_drs_resume_with_workers_at_the_switch_draws_what_the_straight_run_drew(tmp_path):
    """A checkpoint from the end of the epoch before start_epoch, resumed with a worker process: the loader draws
    its first indices before Lightning updates current_epoch; the resumed epochs must equal the straight run's."""
    counts = [300, 60, 12]
    straight = EpochIndices()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer_for(tmp_path, 3, [DeferredResampling(1, seed=3), ckpt, straight]).fit(
        ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule(counts, 31))
    resumed = EpochIndices()
    trainer = trainer_for(tmp_path, 3, [DeferredResampling(1), resumed], enable_checkpointing=False)
    trainer.fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule(counts, 31, num_workers=1),
                ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert sorted(resumed.seen) == [1, 2]
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    assert int(torch.bincount(targets[torch.tensor(resumed.seen[1])], minlength=3)[2]) > 60  # balanced already
    for epoch in (1, 2):
        assert resumed.seen[epoch] == straight.seen[epoch]



@pytest.mark.parametrize("case", ["last_batch_checkpoint_with_workers", "iteration_based"])
def test_drs_resumed_epochs_draw_what_the_straight_run_drew(tmp_path, case):
    """A checkpoint from an epoch's last batch (every_n_train_steps = the epoch's length), resumed with a worker:
    the loader drew the finished epoch's list again. Iteration-based training (max_steps, max_epochs=-1) resumed
    from an epoch's end: the sampler ran one epoch ahead for the rest of the run (Lightning's processed count runs
    ahead of current_epoch there)."""
    counts = [300, 60, 12]  # 372 samples, 12 batches of 31 per epoch
    limits = {"max_epochs": 3} if case != "iteration_based" else {"max_epochs": -1, "max_steps": 36}
    every = {"every_n_train_steps": 12} if case != "iteration_based" else {"every_n_epochs": 1}
    workers = 1 if case != "iteration_based" else 0

    def fit(callbacks, ckpt_path=None, num_workers=0):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, callbacks=callbacks, **limits)
        trainer.fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule(counts, 31, num_workers),
                    ckpt_path=ckpt_path)

    straight = EpochIndices()
    fit([DeferredResampling(1, seed=3), straight,
         ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}", **every)])
    resumed = EpochIndices()
    fit([DeferredResampling(1), resumed], tmp_path / "ckpt" / "epoch=0.ckpt", workers)
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    assert int(torch.bincount(targets[torch.tensor(straight.seen[0])], minlength=3)[2]) == 12  # a permutation
    assert int(torch.bincount(targets[torch.tensor(straight.seen[1])], minlength=3)[2]) > 60  # balanced
    if case == "iteration_based":
        # Lightning resumes iteration-based training as if mid-epoch: one extra batch still counted in epoch 0
        # (current_epoch 0), then epochs 1 and 2 one step later, epoch 2 cut short by max_steps
        assert sorted(resumed.seen) == [0, 1, 2] and len(resumed.seen[0]) == 31
        resumed.seen[2] += straight.seen[2][len(resumed.seen[2]):]
    else:
        assert sorted(resumed.seen) == [1, 2]
    for epoch in (1, 2):  # the epochs Lightning reports draw the straight run's lists (as DRW's epochs follow them)
        assert resumed.seen[epoch] == straight.seen[epoch]

def test_drs_refuses_a_loader_that_ignores_its_sampler_and_restores_after_a_failure(tmp_path):
    class IgnoresSampler(TinyDataModule):
        def train_dataloader(self):
            return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)

    dm = IgnoresSampler()
    with pytest.raises(RuntimeError, match="does not use it"):
        trainer_for(tmp_path, 1, [DeferredResampling(0)]).fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), dm)
    assert dm.train_sampler is None  # put back although the fit failed

    class Boom(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("crash")

    dm = TinyDataModule()
    with pytest.raises(RuntimeError, match="crash"):
        trainer_for(tmp_path, 2, [DeferredResampling(0), Boom()]).fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3),
                                                                     dm)
    assert dm.train_sampler is None
    trainer_for(tmp_path, 1, [DeferredResampling(0)], enable_checkpointing=False).fit(
        ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), dm)  # and a new DRS can install its own


def test_reused_drw_reads_the_new_datamodules_counts(tmp_path):
    drw = DeferredReweighting(start_epoch=0, beta=BETA)
    trainer_for(tmp_path, 1, [drw], enable_checkpointing=False).fit(model_for(), datamodule=TinyDataModule())
    assert drw.class_weights().tolist() == pytest.approx(cb_weights(COUNTS, BETA))
    other = [10, 20, 30]
    trainer_for(tmp_path, 1, [drw], enable_checkpointing=False).fit(model_for(), datamodule=TinyDataModule(other))
    assert drw.class_weights().tolist() == pytest.approx(cb_weights(other, BETA))
    given = DeferredReweighting(start_epoch=0, beta=BETA, cls_num_list=COUNTS)  # given counts are kept
    trainer_for(tmp_path, 1, [given], enable_checkpointing=False).fit(model_for(), datamodule=TinyDataModule(other))
    assert given.class_weights().tolist() == pytest.approx(cb_weights(COUNTS, BETA))


@pytest.mark.parametrize("mode", ["weighting", "criterion"])
def test_drw_mid_epoch_resume_keeps_the_weights(tmp_path, mode):
    """Lightning calls no on_train_epoch_start for the epoch a mid-epoch checkpoint resumes into."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=6, filename="{step}")
    trainer_for(tmp_path, 3, [DeferredReweighting(1, BETA, mode, COUNTS), ckpt]).fit(model_for(), TinyDataModule())
    probe = Probe()
    trainer = trainer_for(tmp_path, 3, [DeferredReweighting(1, BETA, mode, COUNTS), probe],
                          enable_checkpointing=False)
    trainer.fit(model_for(), TinyDataModule(), ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")  # epoch 1, batch 2 of 4
    assert [r["epoch"] for r in probe.rows][:3] == [1, 1, 2]
    check_rows(probe.rows, 1, mode)


def test_drw_weighting_without_reweight_call_is_an_error(tmp_path):
    class Plain(ReweightClassifier):
        def training_step(self, batch, batch_idx):
            x, y, _ = batch
            return torch.nn.functional.cross_entropy(self(x), y)  # never calls self.reweight

    model = Plain(MLP(64, 3, hidden=(8,)), 3)
    with pytest.raises(RuntimeError, match="never called self.reweight"):
        trainer_for(tmp_path, 2, [DeferredReweighting(0, BETA, cls_num_list=COUNTS)],
                    enable_checkpointing=False).fit(model, TinyDataModule())


def test_class_weighting_validates_and_zero_weight_batch_gives_zeros():
    for bad in ([-1.0, 2.0], [0.0, 0.0], [[1.0, 2.0]], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="class_weights"):
            ClassWeighting(torch.tensor(bad))
    src = ClassWeighting(torch.tensor([0.0, 3.0]))
    targets = torch.tensor([0, 0])
    assert torch.equal(src.sample_weights(torch.ones(2), WeightingContext(None, targets=targets)), torch.zeros(2))
    w = src.sample_weights(torch.ones(3), WeightingContext(None, targets=torch.tensor([0, 1, 1])))
    assert w.tolist() == pytest.approx([0.0, 1.5, 1.5])  # c_y * B / sum(c_y) = 3 * 3 / 6
    with pytest.raises(ValueError, match="one shape"):
        src.sample_weights(torch.ones(3), WeightingContext(None, targets=torch.tensor([0, 1])))


def test_drw_criterion_mode_with_ldam_waiting_for_counts(tmp_path):
    """``LDAMLoss(cls_num_list=None)`` with ``DeferredReweighting(mode="criterion")``: the callback's setup (which
    runs before the module's) gives the loss the datamodule's counts; the losses are those of the explicit LDAM."""
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(64, 3, hidden=(16,)), 3, criterion=LDAMLoss(s=5.0, reduction="none"), lr=0.05)
    probe = Probe()
    trainer_for(tmp_path, 3, [DeferredReweighting(1, BETA, "criterion"), probe], enable_checkpointing=False).fit(
        model, TinyDataModule())
    assert model.criterion.cls_num_list == tuple(COUNTS)
    check_rows(probe.rows, 1, "criterion")


def test_drw_counts_that_differ_from_a_lazy_ldams_data_counts_warn_and_do_not_replace_them(tmp_path):
    """DRW with explicit counts other than the data's: the lazy LDAM keeps the datamodule's counts (its margins
    are the training data's) and a warning names both (DRW used to overwrite the loss's counts every epoch)."""
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, criterion=LDAMLoss(s=5.0, reduction="none"), lr=0.05)
    other = [4, 9, 30]
    expected = r"counts \[4, 9, 30\], but the criterion LDAMLoss was built for \[40, 16, 8\]"
    with pytest.warns(UserWarning, match=expected):
        trainer_for(tmp_path, 2, [DeferredReweighting(1, BETA, "criterion", other)], enable_checkpointing=False).fit(
            model, TinyDataModule())
    assert model.criterion.cls_num_list == tuple(COUNTS)
    assert torch.allclose(model.criterion.margins, torch.tensor([0.5 * (min(COUNTS) / n) ** 0.25 for n in COUNTS]))
    assert torch.allclose(model.criterion.weight, torch.tensor(cb_weights(other, BETA)), rtol=1e-5)  # DRW's own



# ------------------------------------------------------------------------------ checks on the schedule (review)
@pytest.mark.parametrize("make", [
    lambda: DeferredReweighting(5, cls_num_list=COUNTS),
    lambda: DeferredResampling(5),
    lambda: DeferredReweighting(5),
])
def test_a_start_epoch_the_run_never_reaches_is_warned_about(tmp_path, make):
    """DeferredReweighting(10) with max_epochs=2 trained plain cross-entropy without a word."""
    with pytest.warns(UserWarning, match=r"start_epoch=5 is never reached with max_epochs=2"):
        trainer_for(tmp_path, 2, [make()]).fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule())


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_start_epoch_beyond_max_steps_is_warned_about_and_one_within_is_not(tmp_path, accumulate):
    """With max_steps (max_epochs=-1) the run ends in the epoch of its max_steps-th optimizer step: DRW(5) with a
    run of 2 epochs' steps trained plain cross-entropy without a word; one step into epoch 5 is not warned about."""
    import math
    import warnings

    steps_per_epoch = math.ceil(math.ceil(sum(COUNTS) / 16) / accumulate)  # batches of 16, then accumulation

    def messages(max_steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer_for(tmp_path, -1, [DeferredReweighting(5, cls_num_list=COUNTS)], max_steps=max_steps,
                        accumulate_grad_batches=accumulate).fit(
                ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule())
        return [str(w.message) for w in caught if "never reached" in str(w.message)]

    assert any(f"start_epoch=5 is never reached with max_steps={2 * steps_per_epoch}" in m and "epochs 0-1" in m
               for m in messages(2 * steps_per_epoch))
    assert messages(5 * steps_per_epoch + 1) == []


def test_drs_with_overfit_batches_names_the_trainer_option(tmp_path):
    """overfit_batches makes Lightning swap the sampler out: the error names that option, not the datamodule."""
    with pytest.raises(RuntimeError, match=r"overfit_batches=2: Lightning replaces"):
        trainer_for(tmp_path, 1, [DeferredResampling(0)], overfit_batches=2).fit(
            ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule())


def test_drw_counts_for_the_wrong_number_of_classes_are_refused_at_setup(tmp_path):
    """cls_num_list=[10, 5] on 3-class data trained until start_epoch, then failed with a bare IndexError."""
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3)
    for mode in ("weighting", "criterion"):
        with pytest.raises(ValueError, match=r"cls_num_list has 2 classes but the datamodule's train_class_counts"):
            trainer_for(tmp_path, 2, [DeferredReweighting(1, mode=mode, cls_num_list=[10, 5])]).fit(
                model, TinyDataModule())
    with pytest.warns(UserWarning, match=r"differs from the datamodule's train_class_counts \[40, 16, 8\]"):
        trainer_for(tmp_path, 1, [DeferredReweighting(0, cls_num_list=[40, 16, 9])]).fit(model, TinyDataModule())
    weighting = ClassWeighting(torch.ones(2))  # used directly, with a target of a class it has no weight for
    with pytest.raises(ValueError, match="a target of class 2 but class weights for 2 classes"):
        weighting.sample_weights(torch.ones(3), WeightingContext(None, targets=torch.tensor([0, 1, 2])))


@pytest.mark.parametrize("counts", [[40, 0, 8], [40, 16, 0]])
def test_drs_refuses_an_empty_class_wherever_it_is(tmp_path, counts):
    """An empty last class passed silently (bincount without minlength) while an empty middle one failed with a
    message about cls_num_list, an argument DRS does not take."""
    dm = TinyDataModule(counts)
    dm.num_classes = 3
    with pytest.raises(ValueError, match=r"DeferredResampling: class\(es\) \[\d\] have no training samples"):
        trainer_for(tmp_path, 1, [DeferredResampling(0)]).fit(ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), dm)


def test_the_sampler_splits_its_list_between_ranks():
    """Each rank yields every world-size-th index of the shared list (padded by its start to a multiple)."""
    from lightning_reweight.samplers import DeferredWeightedSampler

    shares = [list(DeferredWeightedSampler(7, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    full = torch.randperm(7, generator=torch.Generator().manual_seed(3)).tolist()
    padded = full + full[:2]  # 9 = 3 x ceil(7 / 3)
    assert shares == [padded[r::3] for r in range(3)] and all(len(s) == 3 for s in shares)
    assert len(DeferredWeightedSampler(7, num_replicas=3, rank=1)) == 3
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        DeferredWeightedSampler(7, num_replicas=2, rank=2)
    for bad in (2.5, 7.0, True):  # a float was truncated to int silently (2.5 samples gave 2)
        with pytest.raises(TypeError, match="num_samples must be an int"):
            DeferredWeightedSampler(bad)
    # fewer samples than ranks: every rank still gets its one index (the list repeated to the padded length)
    assert [list(DeferredWeightedSampler(1, num_replicas=4, rank=r)) for r in range(4)] == [[0]] * 4


def test_the_sampler_used_directly_takes_the_process_groups_ranks(monkeypatch):
    """Used without DRS in a DDP run (Lightning leaves a DistributedSampler in place), it must still split the
    list between the ranks: without explicit num_replicas/rank it reads the initialised process group."""
    import lightning_reweight.samplers as samplers

    monkeypatch.setattr(samplers.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(samplers.dist, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(samplers.dist, "get_rank", lambda rank=rank: rank)
        shares.append(list(samplers.DeferredWeightedSampler(10, seed=4)))
    full = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert shares == [full[0::2], full[1::2]]
    assert list(samplers.DeferredWeightedSampler(10, seed=4, num_replicas=1, rank=0)) == full  # explicit wins


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0])
def test_the_sampler_refuses_weights_it_could_never_draw_from(bad):
    """An inf weight was accepted and failed only once weighted sampling started (epoch 160 of 200), in torch's
    words ("invalid multinomial distribution")."""
    from lightning_reweight.samplers import DeferredWeightedSampler

    with pytest.raises(ValueError, match="finite and non-negative"):
        DeferredWeightedSampler(3, [1.0, bad, 1.0], start_epoch=1)


def test_criterion_mode_resumed_in_bf16_does_not_take_its_own_rounded_weights_for_the_criterions(tmp_path):
    """precision="bf16-true" rounds the weights DRW wrote into a torch criterion's weight buffer to bf16; resuming
    from a checkpoint after start_epoch warned that the criterion came with class weights of its own."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(epochs, **kw):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3,
                                   criterion=torch.nn.CrossEntropyLoss(weight=torch.ones(3), reduction="none"))
        callbacks = [DeferredReweighting(0, BETA, "criterion", COUNTS)]
        if "ckpt_path" not in kw:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
        trainer_for(tmp_path, epochs, callbacks, precision="bf16-true",
                    enable_checkpointing="ckpt_path" not in kw).fit(model, TinyDataModule(), **kw)
        return model

    first = fit(1)
    assert first.criterion.weight.dtype == torch.bfloat16
    assert not torch.equal(first.criterion.weight.float(), torch.tensor(cb_weights(COUNTS, BETA)))  # rounded
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*own class weights.*")
        fit(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_criterion_mode_warns_when_it_replaces_the_criterions_own_class_weights(tmp_path):
    """LDAMLoss(weight=[0.5, 1, 4]) + DeferredReweighting(mode="criterion") trained with ones, then DRW's weights:
    the explicit weights were dropped without a word."""
    import warnings

    from lightning_reweight.losses import LDAMLoss

    def fit(criterion):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, criterion=criterion)
        trainer_for(tmp_path, 1, [DeferredReweighting(1, BETA, "criterion", COUNTS)],
                    enable_checkpointing=False).fit(model, TinyDataModule())
        return model

    with pytest.warns(UserWarning, match=r"replaces the criterion's own class weights \[0.5, 1.0, 4.0\]"):
        model = fit(LDAMLoss(COUNTS, weight=[0.5, 1.0, 4.0], reduction="none"))
    assert torch.equal(model.criterion.weight, torch.ones(3))  # as documented: ones before start_epoch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*own class weights.*")
        fit(LDAMLoss(COUNTS, reduction="none"))  # no weights of its own: silent
        # a second fit of the same module with a new callback and another beta: the buffer holds the weights the
        # first callback wrote, which are not the criterion's own
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, criterion=LDAMLoss(COUNTS, reduction="none"))
        for beta, epochs in ((BETA, 2), (0.9, 1)):
            trainer_for(tmp_path, epochs, [DeferredReweighting(1, beta, "criterion", COUNTS)],
                        enable_checkpointing=False).fit(model, TinyDataModule())


# ---------------------------------------------------------------------------- from the fourth mutation audit
class _Tiny(L.LightningModule):
    """One linear layer; under manual optimization it steps its optimizer after every second batch only."""

    def __init__(self, automatic: bool) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("limits, batches, accumulate, automatic", [
    ({"max_epochs": -1, "max_steps": 7}, 7, 3, True),  # 3 steps per epoch, the last of 1 batch: epochs 0-2
    ({"max_epochs": 2, "max_steps": 100}, 6, 1, True),  # max_epochs ends the run first
    ({"max_epochs": 5, "max_steps": 8}, 6, 2, True),  # max_steps first: 3 steps per epoch, epochs 0-2
    ({"max_epochs": -1, "max_steps": 6}, 6, 2, True),  # exactly two epochs of 3 steps: epochs 0-1
    ({"max_epochs": -1, "max_steps": 6}, 6, 1, False),  # manual: 3 steps per epoch of 6 batches, epochs 0-1
])
def test_last_epoch_is_the_last_epoch_the_run_trains(tmp_path, limits, batches, accumulate, automatic):
    """The schedule checks' last epoch against the epochs a run actually trains: exact under automatic optimization
    (the earlier of the max_epochs and max_steps limits, a partial accumulation step closing each epoch); under
    manual optimization, where the steps per batch are unknown, never earlier than the real one (a start epoch the
    run does reach must not be warned about)."""
    from lightning_reweight.callbacks._schedule import last_epoch

    computed, trained = [], set()

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            computed.append(last_epoch(trainer))

        def on_train_batch_start(self, trainer, *args):
            trained.add(trainer.current_epoch)

    L.Trainer(**limits, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, callbacks=[Spy()],
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).fit(
        _Tiny(automatic), DataLoader(TensorDataset(torch.randn(4 * batches, 2)), batch_size=4))
    (last,) = computed
    if automatic:
        assert last is not None and last[0] == max(trained)
    else:
        assert last is None or last[0] >= max(trained)


def test_drs_with_overfit_batches_one_names_the_trainer_option(tmp_path):
    """overfit_batches=1 (one batch) swaps the sampler out as any other positive value does: the error names it."""
    with pytest.raises(RuntimeError, match=r"overfit_batches=1: Lightning replaces"):
        trainer_for(tmp_path, 1, [DeferredResampling(0)], overfit_batches=1).fit(
            ReweightClassifier(MLP(64, 3, hidden=(8,)), 3), TinyDataModule())
