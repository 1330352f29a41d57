"""ReweightClassifier: criterion checks, the split of weighting criteria, and training on the digits."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_reweight import ReweightClassifier
from lightning_reweight.classifier import build_optimizer
from lightning_reweight.models import MLP


class DoubleFirstClass(nn.Module):
    """A criterion that is also a weighting source: weight 2 on class 0, 1 elsewhere."""

    def __init__(self):
        super().__init__()
        self.base_loss = nn.CrossEntropyLoss(reduction="none")

    def sample_weights(self, losses, context):
        return torch.where(context.targets == 0, 2.0, 1.0)

    def forward(self, logits, targets):  # pragma: no cover - the classifier uses the split route
        raise AssertionError("not called")


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 3, 4]), torch.arange(6)


def test_reduced_criterion_is_rejected():
    with pytest.raises(ValueError, match="reduction='none'"):
        ReweightClassifier(MLP(64, 10), criterion=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="optimizer"):
        ReweightClassifier(MLP(64, 10), optimizer="lbfgs")
    with pytest.raises(ValueError, match="num_classes"):
        ReweightClassifier(MLP(64, 10), num_classes=1)


def test_plain_training_step_is_cross_entropy_mean():
    model = ReweightClassifier(MLP(64, 10, hidden=(16,)))
    x, y, idx = _batch()
    assert torch.allclose(model.training_step((x, y, idx), 0), F.cross_entropy(model(x), y))


def test_weighting_criterion_is_split_and_attached():
    model = ReweightClassifier(MLP(64, 10, hidden=(16,)), criterion=DoubleFirstClass())
    x, y, idx = _batch()
    per_sample = F.cross_entropy(model(x), y, reduction="none")
    w = torch.tensor([2.0, 1, 1, 2, 1, 1])
    assert torch.allclose(model.training_step((x, y, idx), 0), (w * per_sample).mean())
    assert "criterion" in model.weightings


def test_build_optimizer_settings():
    p = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(p, "sgd", 0.1, momentum=0.8, weight_decay=1e-4, nesterov=True)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 1e-4
    assert type(build_optimizer(p, "adamw", 1e-3)).__name__ == "AdamW"
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(p, "sgd", 0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_optimizer_gets_the_modules_settings(optimizer):
    """lr, weight decay (every optimizer) and momentum / Nesterov (SGD) as given to the module, not the defaults."""
    model = ReweightClassifier(MLP(64, 10, hidden=(8,)), optimizer=optimizer, lr=0.03, momentum=0.7,
                               weight_decay=1e-3, nesterov=True)
    opt = model.configure_optimizers()
    assert opt.defaults["lr"] == 0.03 and opt.defaults["weight_decay"] == 1e-3
    if optimizer == "sgd":
        assert opt.defaults["momentum"] == 0.7 and opt.defaults["nesterov"] is True
    # the weight decay acts: one step with a zero gradient still shrinks the weights (Adam: the L2 term is the
    # gradient, AdamW: w <- w (1 - lr wd); SGD: the L2 term with momentum's first step = lr wd w)
    (p,) = [q for q in model.parameters() if q.dim() == 2][:1]
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    if optimizer == "adamw":
        torch.testing.assert_close(p.detach(), before * (1 - 0.03 * 1e-3))
    elif optimizer == "adam":  # g = wd w; Adam's bias-corrected first step is lr g / (|g| + eps), eps = 1e-8
        g = 1e-3 * before
        torch.testing.assert_close(p.detach(), before - 0.03 * g / (g.abs() + 1e-8))
    else:  # Nesterov's first step: w - lr (g + momentum g), g = wd w
        torch.testing.assert_close(p.detach(), before - 0.03 * (1 + 0.7) * 1e-3 * before)


def test_trains_on_clean_digits():
    from lightning_reweight.data import DigitsDataModule

    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, meta_per_class=0)
    model = ReweightClassifier(MLP(64, 10, hidden=(64,)), lr=0.05, scheduler="cosine")
    trainer = L.Trainer(
        max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    trainer.fit(model, datamodule=dm)
    (res,) = trainer.test(model, datamodule=dm, verbose=False)
    # 8x8 digits are easy: a small MLP reaches well over 90% (chance is 10%)
    assert res["test/acc"] > 0.9
    assert res["test/balanced_acc"] > 0.9
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.05  # the cosine schedule ran


@pytest.mark.parametrize("scheduler", ["cosine", "warmup_multistep", "multistep"])
def test_scheduler_steps_once_per_epoch_along_its_formula(scheduler):
    """The lr seen by every training step, against the closed form of the schedule (epoch-wise, constant within an
    epoch): cosine over max_epochs, linear warm-up then x gamma at each milestone, or x gamma at each milestone."""
    import math

    from torch.utils.data import DataLoader, TensorDataset

    seen: dict[int, set[float]] = {}

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, set()).add(trainer.optimizers[0].param_groups[0]["lr"])

    data = DataLoader(TensorDataset(*_batch()), batch_size=2)  # 3 steps per epoch
    model = ReweightClassifier(MLP(64, 5, hidden=(4,)), num_classes=5, lr=0.1, scheduler=scheduler,
                               milestones=(3,), gamma=0.5, warmup_epochs=2)
    L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[RecordLR()]).fit(model, data)
    if scheduler == "cosine":
        expected = [0.1 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    elif scheduler == "warmup_multistep":
        expected = [0.05, 0.1, 0.1, 0.05, 0.05]  # (e + 1) / 2 for e < 2, then 0.5 from epoch 3
    else:
        expected = [0.1 * 0.5 ** (e >= 3) for e in range(5)]  # gamma=0.5 (not torch's default 0.1) from epoch 3 on
    for epoch, lr in enumerate(expected):
        (got,) = seen[epoch]  # one lr per epoch
        assert got == pytest.approx(lr)


def test_cosine_over_max_steps_decays_once_per_run():
    """Step-based training (max_steps, max_epochs=-1) gave T_max=1: the lr jumped between lr and 0 every epoch."""
    import math

    from torch.utils.data import DataLoader, TensorDataset

    seen: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    data = DataLoader(TensorDataset(*_batch()), batch_size=2)  # 3 steps per epoch
    model = ReweightClassifier(MLP(64, 5, hidden=(4,)), num_classes=5, lr=0.1, scheduler="cosine")
    L.Trainer(max_steps=12, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", callbacks=[RecordLR()]).fit(model, data)
    assert seen == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 12)) / 2 for s in range(12)])
    unbounded = L.Trainer(max_epochs=-1, max_time="00:00:00:05", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match='scheduler="cosine" anneals over the run, which has no end here'):
        unbounded.fit(ReweightClassifier(MLP(64, 5, hidden=(4,)), num_classes=5, scheduler="cosine"), data)

def test_balanced_accuracy_leaves_out_classes_missing_from_the_targets():
    """Class 2 never appears in the test targets but is predicted: it is not a 0-recall class (per-class counting)."""
    from torch.utils.data import DataLoader, TensorDataset

    class Fixed(nn.Module):  # predicts x[:, 0] as the class
        def forward(self, x):
            return F.one_hot(x[:, 0].long(), 3).float()

    x = torch.tensor([[0.0], [0.0], [1.0], [2.0], [1.0]])
    y = torch.tensor([0, 1, 1, 1, 1])  # class 0: 1/1 right; class 1: 2/4 right; class 2: absent
    model = ReweightClassifier(Fixed(), 3)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    (res,) = trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=2), verbose=False)
    assert res["test/acc"] == pytest.approx(3 / 5)
    assert res["test/balanced_acc"] == pytest.approx((1 / 1 + 2 / 4) / 2)  # not (1 + 0.5 + 0) / 3


def test_checkpoint_of_a_stateful_criterion_loads_for_inference(tmp_path):
    """An ABSGD checkpoint (criterion buffers log_u, u_lam, ...) into a module built with the default criterion,
    and an LDAM module from a plain checkpoint: the backbone loads exactly, the criterion mismatch is a warning."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_reweight.losses import AttentionalDROLoss, LDAMLoss

    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=0.3))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    path = tmp_path / "absgd.ckpt"
    trainer.save_checkpoint(path)
    assert any(k.startswith("criterion.") for k in torch.load(path, weights_only=True)["state_dict"])
    with pytest.warns(UserWarning, match=r"criterion\.log_u"):
        plain = ReweightClassifier.load_from_checkpoint(path, backbone=MLP(64, 3, hidden=(8,)))
    for a, b in zip(plain.backbone.parameters(), model.backbone.parameters()):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match=r"criterion\.margins"):
        ldam = ReweightClassifier.load_from_checkpoint(
            path, backbone=MLP(64, 3, hidden=(8,)), criterion=LDAMLoss([20, 8, 4], reduction="none"))
    assert torch.equal(ldam.criterion.margins, LDAMLoss([20, 8, 4]).margins)  # its own, from the counts
    same = ReweightClassifier.load_from_checkpoint(path, backbone=MLP(64, 3, hidden=(8,)),
                                                   criterion=AttentionalDROLoss(lam=0.3))
    assert torch.equal(same.criterion.log_u, model.criterion.log_u)  # a matching criterion loads its state


def test_predict_returns_the_test_sets_logits_in_order():
    """``trainer.predict`` (and ``lightning-reweight predict``) on a datamodule: the test set's logits, in order."""
    from lightning_reweight.data import DigitsDataModule

    torch.manual_seed(0)
    model = ReweightClassifier(MLP(64, 10, hidden=(8,)), 10)
    dm = DigitsDataModule(meta_per_class=0, eval_batch_size=100)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logits = torch.cat(trainer.predict(model, datamodule=dm))
    x = torch.stack([dm.test_dataset[i][0] for i in range(len(dm.test_dataset))])
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    assert model.predict_step(x[:3], 0).shape == (3, 10)  # a bare input tensor works too


def test_count_based_criterion_is_checked_against_the_datamodules_counts():
    """LDAM built for hand-typed counts that are not the data's: a warning naming both (and none when they match)."""
    import warnings

    from lightning_reweight.data import DigitsDataModule
    from lightning_reweight.losses import LDAMLoss, LogitAdjustedLoss

    dm = DigitsDataModule(imbalance_ratio=10.0, meta_per_class=0)
    dm.setup("fit")
    counts = dm.train_class_counts

    def fit(criterion):
        model = ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, criterion=criterion)
        L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(model, datamodule=dm)

    wrong = [100, 80, 60, 50, 40, 30, 25, 20, 15, 10]
    with pytest.warns(UserWarning, match=r"built for class counts \[100, 80"):
        fit(LDAMLoss(wrong, reduction="none"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*built for class counts.*")
        fit(LDAMLoss(counts, reduction="none"))
        fit(LogitAdjustedLoss(counts, reduction="none"))


def test_count_based_criterion_without_counts_takes_the_datamodules(tmp_path):
    """``LDAMLoss()`` / ``LogitAdjustedLoss()`` (as a config file writes them) get the datamodule's training counts
    at fit; a checkpoint then loads into a criterion still without counts, and testing keeps the loaded values."""
    import warnings

    from lightning_reweight.data import DigitsDataModule
    from lightning_reweight.losses import LDAMLoss, LogitAdjustedLoss

    dm = DigitsDataModule(imbalance_ratio=10.0, meta_per_class=0)
    dm.setup("fit")
    counts = dm.train_class_counts
    assert len(set(counts)) > 1
    trainer_kw = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    for criterion in (LDAMLoss(max_m=0.5, reduction="none"), LogitAdjustedLoss(tau=1.0, reduction="none")):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, criterion=criterion)
        trainer = L.Trainer(default_root_dir=tmp_path, **trainer_kw)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*built for class counts.*")
            trainer.fit(model, datamodule=dm)
        assert criterion.cls_num_list == tuple(counts)
        if isinstance(criterion, LDAMLoss):  # Delta_j = 0.5 * (n_min / n_j)^(1/4)
            expected = torch.tensor([0.5 * (min(counts) / n) ** 0.25 for n in counts])
            assert torch.allclose(criterion.margins, expected, atol=1e-6)
        else:  # log of the class prior
            expected = torch.log(torch.tensor(counts, dtype=torch.float64) / sum(counts)).float()
            assert torch.allclose(criterion.offsets, expected, atol=1e-6)
        path = tmp_path / f"{type(criterion).__name__}.ckpt"
        trainer.save_checkpoint(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*criterion differs.*")
            loaded = ReweightClassifier.load_from_checkpoint(
                path, backbone=MLP(64, 10, hidden=(8,)), criterion=type(criterion)(reduction="none"))
        for name, buf in criterion.named_buffers():
            assert torch.equal(dict(loaded.criterion.named_buffers())[name], buf)
        balanced = DigitsDataModule(meta_per_class=0)  # other counts: testing must not replace the loaded values
        L.Trainer(**trainer_kw).test(loaded, datamodule=balanced, verbose=False)
        for name, buf in criterion.named_buffers():
            assert torch.equal(dict(loaded.criterion.named_buffers())[name], buf)


# ---------------------------------------------------------------------------- review as a user: bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheduler": "multistep", "milestones": (2,), "gamma": 0.0}, "gamma"),
        ({"scheduler": "multistep", "milestones": (2,), "gamma": -1.0}, "gamma"),
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": -1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"warmup_epochs": -1}, "warmup_epochs"),
        ({"milestones": 5}, "milestones"),
        ({"milestones": (2.5,)}, "milestones"),
    ],
)
def test_optimization_arguments_are_checked_when_the_module_is_built(kwargs, match):
    """They used to pass __init__ and fail only in configure_optimizers (after the data was set up); a
    non-positive multistep gamma was never refused and trained with lr 0 or a negative lr (gradient ascent)."""
    with pytest.raises(ValueError, match=match):
        ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, **kwargs)


@pytest.mark.parametrize("scheduler", ["multistep", "warmup_multistep"])
def test_a_step_schedule_without_milestones_warns(scheduler):
    with pytest.warns(UserWarning, match="never decays"):
        ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, scheduler=scheduler)


def _fit_one_batch(model, dm):
    L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, accelerator="cpu").fit(model, datamodule=dm)


def test_num_classes_is_checked_against_the_data_and_the_backbone():
    """num_classes=5 on 10-class digits trained silently (and failed only at test, in torchmetrics' words); a
    backbone with 3 outputs and num_classes=4 trained and tested silently."""
    from lightning_reweight.data import DigitsDataModule
    from lightning_reweight.losses import LDAMLoss

    dm = DigitsDataModule(meta_per_class=0)
    with pytest.raises(ValueError, match=r"num_classes=5\) but the datamodule has 10 classes"):
        _fit_one_batch(ReweightClassifier(MLP(64, 5, hidden=(8,)), 5), dm)
    with pytest.warns(UserWarning, match=r"num_classes=12\) but the datamodule has 10 classes"):
        _fit_one_batch(ReweightClassifier(MLP(64, 12, hidden=(8,)), 12), dm)
    with pytest.raises(ValueError, match=r"logits of shape \(100, 3\).*num_classes=10"):
        _fit_one_batch(ReweightClassifier(MLP(64, 3, hidden=(8,)), 10), dm)
    with pytest.raises(ValueError, match=r"built for 5 classes"):
        ldam = LDAMLoss([9] * 5, reduction="none")
        _fit_one_batch(ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, criterion=ldam), dm)


def test_several_validation_loaders_get_their_own_metrics():
    """Clean and noisy validation sets side by side: Lightning refused the module (no dataloader_idx argument)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(60, 1, 8, 8)
    y = torch.randint(0, 10, (60,))
    y_other = (y + 3) % 10
    model = ReweightClassifier(MLP(64, 10, hidden=(8,)), 10)
    train = DataLoader(TensorDataset(x, y, torch.arange(60)), batch_size=20)
    vals = [DataLoader(TensorDataset(x, y), batch_size=25), DataLoader(TensorDataset(x, y_other), batch_size=25)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, train, vals)
    with torch.no_grad():
        preds = model(x).argmax(1)
    metrics = trainer.callback_metrics
    for k, labels in enumerate((y, y_other)):  # reference: the accuracy of the final model's predictions
        assert float(metrics[f"val/acc/dataloader_idx_{k}"]) == pytest.approx(float((preds == labels).float().mean()))
        recalls = [float((preds[labels == c] == c).float().mean()) for c in labels.unique()]
        assert float(metrics[f"val/balanced_acc/dataloader_idx_{k}"]) == pytest.approx(sum(recalls) / len(recalls))
    # the extra metrics add nothing to checkpoints: a module that never saw two loaders loads them strictly
    ReweightClassifier(MLP(64, 10, hidden=(8,)), 10).load_state_dict(model.state_dict())


class _StepLosses(L.Callback):
    def __init__(self, out):
        self.out = out
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((float(outputs["loss"]), int(batch[1].shape[0])))

    def on_train_end(self, trainer, pl_module):
        import json

        with open(f"{self.out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"steps": self.steps, "train_loss": float(trainer.callback_metrics["train/loss"])}, f)


@pytest.mark.ddp
def test_train_loss_is_the_mean_over_every_ranks_batches(tmp_path):
    """train/loss (an epoch value) is reduced over the ranks: each rank used to log the mean of its own half."""
    import json

    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(90, 1, 8, 8), torch.randint(0, 10, (90,))
    model = ReweightClassifier(MLP(64, 10, hidden=(8,)), 10, lr=0.05)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_StepLosses(str(tmp_path))])
    trainer.fit(model, DataLoader(TensorDataset(x, y, torch.arange(90)), batch_size=20))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = ranks[0]["steps"] + ranks[1]["steps"]
    overall = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
    own = [sum(loss * n for loss, n in r["steps"]) / sum(n for _, n in r["steps"]) for r in ranks]
    assert abs(own[0] - own[1]) > 1e-3  # the ranks' own means differ, so the check tells them from the overall
    for r in ranks:
        assert r["train_loss"] == pytest.approx(overall, rel=1e-5)


def test_fit_after_validate_trains_and_validates_with_the_right_balanced_accuracy(tmp_path):
    """trainer.validate runs in inference mode, where the reset balanced-accuracy states became inference tensors;
    the next fit's validation updated them in place and crashed. Validate, fit, then the fit's logged value must be
    the balanced accuracy of the fitted model on the validation set, computed here from its predictions."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (60,), generator=g)
    x = torch.randn(60, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    train = DataLoader(TensorDataset(x, y), batch_size=20)
    val = DataLoader(TensorDataset(x[:30], y[:30]), batch_size=10)
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(64, 3, hidden=(8,)), 3, lr=0.1)

    def trainer():
        return L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)

    trainer().validate(model, val, verbose=False)
    fitted = trainer()
    fitted.fit(model, train, val)
    with torch.no_grad():
        pred = model.eval()(x[:30]).argmax(1)
    recalls = [float((pred[y[:30] == c] == c).float().mean()) for c in range(3)]
    assert float(fitted.callback_metrics["val/balanced_acc"]) == pytest.approx(sum(recalls) / 3, abs=1e-6)
