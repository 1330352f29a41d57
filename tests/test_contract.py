"""The reweighting contract against hand-written reductions."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_reweight.contract import (
    ReweightingMixin,
    WeightingContext,
    check_per_sample_losses,
    mean_scale,
    split_batch,
    weight_statistics,
)


class Tiny(ReweightingMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)

    def per_sample_loss(self, batch):
        x, y, _ = split_batch(batch)
        return F.cross_entropy(self.net(x), y, reduction="none")


class FixedWeights:
    def __init__(self, w):
        self.w = w
        self.seen = []

    def sample_weights(self, losses, context):
        self.seen.append(context)
        return self.w


def _batch(n=6, with_idx=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return (x, y, torch.arange(10, 10 + n)) if with_idx else (x, y)


def test_uniform_is_plain_mean():
    m = Tiny()
    batch = _batch()
    x, y, _ = batch
    expected = F.cross_entropy(m.net(x), y)  # PyTorch's own mean reduction
    assert torch.allclose(m.reweight(m.per_sample_loss(batch), batch), expected)
    assert torch.equal(m.last_sample_weights, torch.ones(6))
    assert torch.equal(m.last_sample_indices, torch.arange(10, 16))


def test_attached_source_gives_weighted_mean_and_context():
    m = Tiny()
    batch = _batch()
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.5, 2.0])
    src = FixedWeights(w)
    m.attach_weighting("fixed", src)
    losses = m.per_sample_loss(batch)
    out = m.reweight(losses, batch)
    manual = sum(float(w[i]) * float(losses[i]) for i in range(6)) / 6
    assert out.item() == pytest.approx(manual, rel=1e-6)
    ctx = src.seen[-1]
    assert isinstance(ctx, WeightingContext) and ctx.module is m
    assert torch.equal(ctx.targets, batch[1]) and torch.equal(ctx.indices, batch[2])


def test_sources_compose_by_product_and_detach():
    m = Tiny()
    batch = _batch()
    a = torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0, 3.0], requires_grad=True)
    b = torch.tensor([2.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    m.attach_weighting("a", FixedWeights(a))
    m.attach_weighting("b", FixedWeights(b))
    losses = m.per_sample_loss(batch)
    out = m.reweight(losses, batch)
    assert out.item() == pytest.approx(float((a.detach() * b * losses).sum() / 6), rel=1e-6)
    out.backward()
    assert a.grad is None  # weights are constants of the backward pass
    m.detach_weighting("b")
    assert list(m.weightings) == ["a"]


def test_class_weighted_mean_matches_pytorch():
    # mean-scale weights c_y * B / sum(c_y) reproduce PyTorch's class-weighted mean reduction
    m = Tiny()
    batch = _batch(8)
    x, y, _ = batch
    c = torch.tensor([0.2, 1.0, 3.0])
    w = c[y] * y.numel() / c[y].sum()
    m.attach_weighting("cw", FixedWeights(w))
    out = m.reweight(m.per_sample_loss(batch), batch)
    assert torch.allclose(out, F.cross_entropy(m.net(x), y, weight=c), rtol=1e-6)


def test_already_reduced_loss_is_rejected():
    m = Tiny()
    with pytest.raises(ValueError, match="reduction='none'"):
        m.reweight(torch.tensor(1.0))
    with pytest.raises(ValueError, match="shape"):
        check_per_sample_losses(torch.ones(2, 3))
    with pytest.raises(ValueError, match="batch has 3"):
        check_per_sample_losses(torch.ones(2), 3)


def test_wrong_weight_shape_and_non_source_rejected():
    m = Tiny()
    m.attach_weighting("bad", FixedWeights(torch.ones(3)))
    with pytest.raises(ValueError, match="shape"):
        m.reweight(m.per_sample_loss(_batch()), _batch())
    with pytest.raises(TypeError, match="sample_weights"):
        m.attach_weighting("x", object())


def test_split_batch_layouts():
    x, y, idx = split_batch(_batch(with_idx=False))
    assert idx is None and x.shape == (6, 4)
    x3, y3, idx3 = split_batch((x, y, torch.arange(6)))
    assert x3 is x and y3 is y and torch.equal(idx3, torch.arange(6))
    with pytest.raises(TypeError, match="batch"):
        split_batch({"x": 1})
    with pytest.raises(TypeError, match="length 4"):  # an extra element: which one holds the indices is unknown
        split_batch((x, y, torch.arange(6), torch.zeros(6)))


def test_mean_scale_and_statistics():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(mean_scale(w), torch.tensor([0.4, 0.8, 1.2, 1.6]))
    assert torch.equal(mean_scale(torch.zeros(3)), torch.zeros(3))
    # a subnormal total still normalises (B / total overflows); a nan total is not mistaken for zero weights
    assert torch.allclose(mean_scale(torch.tensor([1e-40, 3e-40])), torch.tensor([0.5, 1.5]), rtol=1e-4)
    assert mean_scale(torch.tensor([1.0, float("nan")])).isnan().all()
    stats = weight_statistics(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    # ESS = (sum w)^2 / (B * sum w^2) = 16 / (4 * 16)
    assert stats["ess"].item() == pytest.approx(0.25)
    assert stats["zero_frac"].item() == pytest.approx(0.75)
    assert stats["max"].item() == 4.0 and stats["mean"].item() == 1.0
    assert weight_statistics(torch.zeros(3))["ess"].item() == 0.0
    # std is the population one: sqrt(mean((w - 1)^2)) = sqrt((9 + 1 + 1 + 1) / 4)
    assert stats["std"].item() == pytest.approx(3.0**0.5)


class Trainable(Tiny):
    """Tiny with a training step through the contract and an optimizer."""

    def training_step(self, batch, batch_idx):
        return self.reweight(self.per_sample_loss(batch), batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_weight_statistics_are_logged_in_training(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    m = Trainable()
    m.attach_weighting("fixed", FixedWeights(torch.tensor([1.0, 3.0, 1.0, 3.0])))
    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    trainer = L.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(m, DataLoader(ds, batch_size=4))
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert "weights/ess" in header and "weights/max" in header
    row = dict(zip(header, text.splitlines()[1].split(",")))
    assert float(row["weights/ess"]) == pytest.approx(8**2 / (4 * 20))  # (1+3+1+3)^2 / (B * (1+9+1+9))


def test_logged_weight_statistics_are_those_of_the_step_they_are_written_at(tmp_path):
    """Lightning writes on-step logs when ``(step + 1) % log_every_n_steps == 0``; each written ``weights/max``
    must be the maximum weight of that very step (not of an earlier one), and none may be lost."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class StepWeights:
        def sample_weights(self, losses, context):
            step = context.module.trainer.global_step
            return torch.tensor([1.0, 1.0 + step, 1.0, 2.0])

    m = Trainable()
    m.attach_weighting("steps", StepWeights())
    ds = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    every, n_steps = 3, 10
    trainer = L.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=every, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(m, DataLoader(ds, batch_size=4))
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    written = {int(r["step"]): float(r["weights/max"]) for r in rows if r.get("weights/max")}
    expected_steps = [s for s in range(n_steps) if (s + 1) % every == 0]
    assert sorted(written) == expected_steps
    for step, value in written.items():
        assert value == max(2.0, 1.0 + step)


# ------------------------------------------------------------------------------ batch layouts and names (review)
def test_a_third_element_that_is_not_indices_is_not_taken_for_them():
    """(x_a, x_b, y) batches gave the labels to the sources as dataset indices (and x_b as targets); (x, y, paths)
    crashed inside MetaReweight. Only a 1-D integer tensor with one entry per sample counts as indices."""
    m = Tiny()
    x, y, _ = _batch()
    src = FixedWeights(torch.ones(6))
    m.attach_weighting("fixed", src)
    for third in (torch.randn(6, 2), ["a.png"] * 6, torch.arange(5), torch.rand(6)):
        with pytest.warns(UserWarning, match="third element is not a 1-D integer tensor of dataset indices"):
            m.reweight(m.per_sample_loss((x, y)), (x, y, third))
        assert src.seen[-1].indices is None and m.last_sample_indices is None
    m.reweight(m.per_sample_loss((x, y)), (x, y, torch.arange(6, dtype=torch.int32)))
    assert torch.equal(src.seen[-1].indices, torch.arange(6, dtype=torch.int32))


def test_dict_batches_hand_targets_and_indices_through_the_overridable_hook():
    from lightning_reweight.callbacks import ClassWeighting

    class DictModule(Tiny):
        def per_sample_loss(self, batch):
            return F.cross_entropy(self.net(batch["image"]), batch["label"], reduction="none")

        def batch_targets_and_indices(self, batch):
            return batch["label"], batch["index"]

    m = DictModule()
    x, y, idx = _batch()
    batch = {"image": x, "label": y, "index": idx}
    m.attach_weighting("class", ClassWeighting(torch.tensor([1.0, 2.0, 4.0])))
    losses = m.per_sample_loss(batch)
    c = torch.tensor([1.0, 2.0, 4.0])[y]
    assert torch.allclose(m.reweight(losses, batch), (c * losses).sum() / c.sum())  # PyTorch's weighted mean
    assert torch.equal(m.last_sample_indices, idx)


def test_losses_of_another_length_than_the_batch_are_refused():
    m = Tiny()
    x, y, idx = _batch()
    with pytest.raises(ValueError, match="losses has 18 entries but the batch has 6 samples"):
        m.reweight(torch.ones(18), (x, y, idx))  # e.g. (B, C) losses flattened


def test_reserved_names_give_clear_errors():
    class Collides(Tiny):
        def __init__(self):
            super().__init__()
            self.weightings = {"ce": 1.0}

    with pytest.raises(AttributeError, match="weightings is ReweightingMixin's registry"):
        Collides()
    m = Tiny()
    with pytest.raises(AttributeError, match="sample_weights is ReweightingMixin's method"):
        m.sample_weights = torch.ones(6)  # a per-dataset weight table under the method's name
    with pytest.raises(AttributeError, match="weightings is ReweightingMixin's registry"):
        m.weightings = nn.ModuleDict({"head": nn.Linear(2, 2)})  # nn.Module.__setattr__ bypassed a property
    assert m.weightings == {} and "weightings" not in m._modules


def test_reweight_in_validation_does_not_log_training_weight_statistics(tmp_path):
    """A reweight call in validation_step wrote its weights under the training weights/* keys (at the validation
    batch index as the step)."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    class ByStage:
        def sample_weights(self, losses, context):
            return torch.full_like(losses, 1.0 if context.module.training else 2.0)

    class WithValidation(Trainable):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.reweight(self.per_sample_loss(batch), batch))

    m = WithValidation()
    m.attach_weighting("stage", ByStage())
    loader = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=4)
    L.Trainer(max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(m, loader, loader)
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    means = [float(r["weights/mean"]) for r in (dict(zip(header, line.split(","))) for line in lines[1:])
             if r.get("weights/mean")]
    assert means == [1.0] * 8  # the 8 training steps, none of the validation batches
