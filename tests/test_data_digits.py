import ast
import pathlib
import sys

import pytest
import torch
from torch.utils.data import SequentialSampler

from lightning_reweight.data import DigitsDataModule

sklearn_datasets = pytest.importorskip("sklearn.datasets")

DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "lightning_reweight" / "data"


@pytest.fixture(scope="module")
def digits():
    bunch = sklearn_datasets.load_digits()
    return torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target)


def _dm(**kwargs):
    dm = DigitsDataModule(**kwargs)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def noisy_dm():
    return _dm(noise_rate=0.4, meta_per_class=10, seed=0)


def _labels(dataset):
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def test_split_sizes_add_up(noisy_dm, digits):
    _, y = digits
    expected_test = sum(round(0.2 * c) for c in torch.bincount(y).tolist())
    assert len(y) == 1797
    dm = noisy_dm
    assert len(dm.test_dataset) == expected_test == 359
    assert len(dm.meta_dataset) == 100
    assert len(dm.val_dataset) + len(dm.meta_dataset) + len(dm.train_dataset) + len(dm.test_dataset) == 1797
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    x, _ = dm.test_dataset[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32


def test_meta_balanced_clean_and_matches_sklearn(noisy_dm, digits):
    x_all, y_all = digits
    dm = noisy_dm
    source = dm.pool_source_indices[dm.meta_indices]
    meta_y = _labels(dm.meta_dataset)
    assert torch.equal(meta_y, y_all[source])
    assert torch.bincount(meta_y, minlength=10).tolist() == [10] * 10
    x0, _ = dm.meta_dataset[0]
    assert torch.equal(x0.flatten() * 16, x_all[source[0]])


def test_noise_mask_and_rate(noisy_dm, digits):
    _, y_all = digits
    dm = noisy_dm
    n_train = len(dm.train_dataset)
    assert torch.equal(dm.noise_mask, dm.train_targets != dm.clean_train_targets)
    assert int(dm.noise_mask.sum()) == round(0.4 * n_train)
    assert torch.equal(dm.clean_train_targets, y_all[dm.pool_source_indices[dm.train_indices]])
    assert torch.equal(_labels(dm.train_dataset), dm.train_targets)
    assert dm.train_class_counts == torch.bincount(dm.train_targets, minlength=10).tolist()
    assert dm.clean_train_class_counts == torch.bincount(dm.clean_train_targets, minlength=10).tolist()
    # validation and test labels are clean
    assert torch.equal(_labels(dm.val_dataset), y_all[dm.pool_source_indices[dm.val_indices]])
    assert torch.equal(_labels(dm.test_dataset), y_all[dm.test_source_indices])


def test_splits_disjoint_and_test_shared_across_seeds(noisy_dm):
    dm0, dm1 = noisy_dm, _dm(noise_rate=0.4, seed=1)
    parts = [dm0.val_indices, dm0.meta_indices, dm0.train_indices]
    assert sorted(torch.cat(parts).tolist()) == list(range(len(dm0.pool_source_indices)))
    assert set(dm0.test_source_indices.tolist()).isdisjoint(dm0.pool_source_indices.tolist())
    assert torch.equal(dm0.test_source_indices, dm1.test_source_indices)
    assert not torch.equal(dm0.meta_indices, dm1.meta_indices)
    again = _dm(noise_rate=0.4, seed=0)
    assert torch.equal(again.train_targets, dm0.train_targets) and torch.equal(again.meta_indices, dm0.meta_indices)


def test_long_tail_follows_profile(digits):
    _, y_all = digits
    dm = _dm(imbalance_ratio=10.0, meta_per_class=5, noise_rate=0.0)
    pool_y = y_all[dm.pool_source_indices]
    remaining = torch.bincount(pool_y, minlength=10) - torch.bincount(pool_y[dm.val_indices], minlength=10) - 5
    n_max = int(remaining.min())
    assert dm.clean_train_class_counts == [int(n_max * 0.1 ** (i / 9)) for i in range(10)]
    assert dm.train_class_counts == dm.clean_train_class_counts
    assert torch.bincount(_labels(dm.meta_dataset)).tolist() == [5] * 10
    step = _dm(imbalance_ratio=4.0, imbalance_profile="step", meta_per_class=5, seed=3)
    counts = step.clean_train_class_counts
    assert counts[:5] == [counts[0]] * 5 and counts[5:] == [counts[0] // 4] * 5


def test_noisy_long_tail_rate(digits):
    dm = _dm(imbalance_ratio=5.0, noise_rate=0.3, noise_kind="pairflip", seed=2)
    mask = dm.noise_mask
    assert int(mask.sum()) == round(0.3 * len(dm.train_dataset))
    assert torch.equal(dm.train_targets[mask], (dm.clean_train_targets[mask] + 1) % 10)


def test_batches_carry_indices(noisy_dm):
    dm = noisy_dm
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and y.dtype == torch.long and idx.dtype == torch.long
    assert torch.equal(dm.train_targets[idx], y)
    assert dm.noise_mask[idx].shape == (100,)
    first = next(iter(dm.train_dataloader()))[2]
    assert torch.equal(first, idx)  # seeded shuffle
    assert not torch.equal(idx, torch.arange(100))
    mx, my = next(iter(dm.meta_dataloader()))
    assert mx.shape == (100, 1, 8, 8) and len(my) == 100
    assert len(next(iter(dm.val_dataloader()))[0]) == len(dm.val_dataset)
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 359


def test_train_sampler_overrides_shuffle():
    dm = _dm(batch_size=8)
    dm.train_sampler = SequentialSampler(dm.train_dataset)
    _, _, idx = next(iter(dm.train_dataloader()))
    assert idx.tolist() == list(range(8))


def test_setup_idempotent_and_no_meta():
    dm = _dm(meta_per_class=0, val_fraction=0.0)
    train = dm.train_dataset
    dm.setup("fit")
    assert dm.train_dataset is train
    assert dm.meta_dataset is None and len(dm.val_dataset) == 0
    assert len(dm.train_dataset) == 1797 - 359
    with pytest.raises(RuntimeError, match="meta_per_class"):
        dm.meta_dataloader()
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"noise_rate": 1.5}, "noise_rate"),
        ({"noise_rate": -0.2}, "noise_rate"),
        ({"noise_kind": "asym"}, "noise_kind"),
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"imbalance_profile": "linear"}, "imbalance_profile"),
        ({"meta_per_class": -1}, "meta_per_class"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"meta_batch_size": 0}, "meta_batch_size"),
        ({"eval_batch_size": 0}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_meta_quota_too_large():
    with pytest.raises(ValueError, match="per_class"):
        _dm(meta_per_class=500)


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"lightning-reweight\[digits\]"):
        DigitsDataModule().setup()


def _import_time_imports(node):
    """Modules imported when the module runs (i.e. outside function bodies)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return []
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        names = [node.module or ""]
    for child in ast.iter_child_nodes(node):
        names += _import_time_imports(child)
    return names


def test_no_optional_imports_at_import_time():
    files = sorted(DATA_DIR.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        names = _import_time_imports(ast.parse(path.read_text()))
        assert not any(n.split(".")[0] in ("torchvision", "sklearn") for n in names), path
    # the lazy imports exist (inside functions)
    source = (DATA_DIR / "digits.py").read_text() + (DATA_DIR / "cifar.py").read_text()
    assert "from sklearn.datasets import" in source and "from torchvision import" in source


def test_fits_with_lightning_trainer():
    import lightning as L
    from torch import nn

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(noise_rate=0.2)
    trainer = L.Trainer(fast_dev_run=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), datamodule=dm)
    assert dm.hparams["noise_rate"] == 0.2 and dm.hparams["test_fraction"] == 0.2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_run_shuffles_as_the_uninterrupted_run(tmp_path, num_workers):
    """The shuffle generator's state is in the checkpoint: epochs after a resume see the uninterrupted run's order
    (not the first epoch's again), and the final weights are bit-identical; with (persistent) workers too, whose
    new processes after a resume used to draw one more seed from the shuffle generator."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_reweight import ReweightClassifier
    from lightning_reweight.models import MLP

    class Indices(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

    def run(epochs, callbacks, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        model = ReweightClassifier(MLP(64, 10, hidden=(16,)), 10, lr=0.05)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", deterministic=True, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=callbacks, limit_val_batches=0)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=128, meta_per_class=0, num_workers=num_workers),
                    ckpt_path=ckpt_path)
        return model

    straight = Indices()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    straight_model = run(3, [straight, ckpt])
    assert straight.seen[1] != straight.seen[0]
    resumed = Indices()
    resumed_model = run(3, [resumed], ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert sorted(resumed.seen) == [1, 2]
    assert resumed.seen[1] == straight.seen[1] and resumed.seen[2] == straight.seen[2]
    for a, b in zip(resumed_model.parameters(), straight_model.parameters()):
        assert torch.equal(a, b)


def test_reloaded_training_loader_goes_on_with_the_order():
    """reload_dataloaders_every_n_epochs=1 asks for a new loader every epoch: each must not restart the shuffle."""
    import lightning as L

    from lightning_reweight import ReweightClassifier
    from lightning_reweight.models import MLP

    firsts = {}

    class First(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            firsts.setdefault(trainer.current_epoch, batch[2][:8].tolist())

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        reload_dataloaders_every_n_epochs=1, callbacks=[First()])
    dm = DigitsDataModule(batch_size=128, meta_per_class=0)
    trainer.fit(ReweightClassifier(MLP(64, 10, hidden=(8,)), 10), datamodule=dm)
    assert firsts[0] != firsts[1] and firsts[1] != firsts[2] and firsts[0] != firsts[2]


def test_split_errors_name_the_argument_and_what_is_left():
    """The meta split's error named the inner function's parameter (per_class) and not what the validation split
    had left; a meta set that used up a class left training without it silently; the attributes setup() builds
    were bare AttributeErrors before it."""
    with pytest.raises(ValueError, match=r"meta_per_class=10 .* after the validation split \(val_fraction=0.99\)"):
        DigitsDataModule(val_fraction=0.99).setup()
    dm = DigitsDataModule(meta_per_class=125, val_fraction=0.1)
    with pytest.warns(UserWarning, match=r"leave class\(es\) \[8\] without training samples"):
        dm.setup()
    assert 8 not in dm.train_targets.tolist() and dm.train_class_counts[8] == 0  # what the warning says
    fresh = DigitsDataModule(noise_rate=0.4)
    with pytest.raises(AttributeError, match=r"noise_mask is set by setup\(\): call dm.setup\('fit'\) first"):
        fresh.noise_mask  # noqa: B018
    assert getattr(fresh, "train_class_counts", None) is None  # still an AttributeError: getattr defaults work
    with pytest.raises(AttributeError, match="has no attribute 'nosie_mask'"):
        fresh.nosie_mask  # noqa: B018


def test_every_fit_of_a_datamodule_starts_the_seeded_shuffle_afresh():
    """A second ``trainer.fit`` with the same datamodule (e.g. after a first stage) is a new run: its first epoch sees
    the order of a fresh datamodule with the same seed, not the continuation of the previous fit's shuffle."""
    import lightning as L

    from lightning_reweight import ReweightClassifier
    from lightning_reweight.models import MLP

    def first_epoch_order(dm):
        seen = []

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.extend(batch[2].tolist())

        L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, limit_val_batches=0, callbacks=[Record()]).fit(
            ReweightClassifier(MLP(64, 10, hidden=(8,)), 10), datamodule=dm)
        return seen

    dm = DigitsDataModule(batch_size=256, meta_per_class=0, seed=5)
    first, second = first_epoch_order(dm), first_epoch_order(dm)
    fresh = first_epoch_order(DigitsDataModule(batch_size=256, meta_per_class=0, seed=5))
    assert sorted(first) == list(range(len(dm.train_dataset)))
    assert second == first == fresh


def test_a_class_the_splits_emptied_is_named_with_the_split_settings_not_an_absent_n_max():
    """meta_per_class=125 of ~160 samples per class, then a long tail: the error named n_max, which the datamodule
    does not take; it now names the splits' settings."""
    import warnings

    dm = DigitsDataModule(meta_per_class=125, val_fraction=0.1, imbalance_ratio=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split's own warning about the emptied class
        with pytest.raises(ValueError, match=r"val_fraction=0.1, meta_per_class=125\) failed: class \d holds 0 samples"
                           r".*every class needs samples") as err:
            dm.setup()
    assert "lower n_max" not in str(err.value)
