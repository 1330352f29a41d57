from importlib import resources

import numpy as np
import pytest
import torch
from cifar_files import write_cifar10

from lightning_reweight.callbacks import DeferredReweighting
from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.data import ReweightDataModule
from lightning_reweight.losses import LDAMLoss
from lightning_reweight.models import NormalizedLinear

pytest.importorskip("torchvision")
cli_module = pytest.importorskip("lightning.pytorch.cli")

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory):
    """The on-disk CIFAR-10 python format, 20 images per batch."""
    root = tmp_path_factory.mktemp("cifar10")
    rng = np.random.default_rng(0)
    write_cifar10(root, rng.integers(0, 256, size=(100, 3072), dtype=np.uint8), [k % 10 for k in range(100)],
                  rng.integers(0, 256, size=(20, 3072), dtype=np.uint8), [k % 10 for k in range(20)])
    return root


def instantiate(name, data_dir, *extra):
    config = resources.files("lightning_reweight") / "configs" / name
    return cli_module.LightningCLI(
        ReweightClassifier, ReweightDataModule, subclass_mode_data=True, run=False,
        args=["--config", str(config), "--data.init_args.data_dir", str(data_dir),
              "--data.init_args.verify_checksums", "false", "--data.init_args.num_workers", "0",
              "--trainer.accelerator", "cpu", "--trainer.logger", "false", *extra],
    )


def test_ldam_drw_config_reproduces_the_paper_recipe(tiny_cifar10):
    cli = instantiate("cifar10_lt_ldam_drw.yaml", tiny_cifar10)
    model, trainer, dm = cli.model, cli.trainer, cli.datamodule
    assert type(dm).__name__ == "CIFAR10DataModule" and dm.imbalance_ratio == 100.0 and dm.batch_size == 128
    assert isinstance(model.criterion, LDAMLoss) and model.criterion.s == 30.0 and model.criterion.max_m == 0.5
    assert model.criterion.cls_num_list is None  # the training data's counts, given at fit (next test)
    assert isinstance(model.backbone.linear, NormalizedLinear)
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(0.46e6, rel=0.02)
    (drw,) = [cb for cb in trainer.callbacks if isinstance(cb, DeferredReweighting)]
    assert drw.start_epoch == 160 and drw.beta == 0.9999
    assert trainer.max_epochs == 200
    opt_conf = model.configure_optimizers()
    opt, sched = opt_conf["optimizer"], opt_conf["lr_scheduler"]["scheduler"]
    assert opt.defaults["weight_decay"] == 2e-4 and opt.defaults["momentum"] == 0.9
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02) and lrs[4] == pytest.approx(0.1) and lrs[159] == pytest.approx(0.1)
    assert lrs[160] == pytest.approx(1e-3) and lrs[180] == pytest.approx(1e-5)


def test_ldam_drw_config_takes_the_class_counts_of_the_data(tiny_cifar10):
    """The config names no counts: fitting gives LDAM the datamodule's (here 10 ... 5 images per class)."""
    cli = instantiate("cifar10_lt_ldam_drw.yaml", tiny_cifar10, "--data.init_args.imbalance_ratio", "2.0",
                      "--data.init_args.batch_size", "16", "--trainer.fast_dev_run", "true")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    counts = cli.datamodule.train_class_counts
    assert counts[0] == 10 and counts[-1] == 5 and cli.model.criterion.cls_num_list == tuple(counts)
    expected = torch.tensor([0.5 * (5 / n) ** 0.25 for n in counts])  # Delta_j = max_m (n_min / n_j)^(1/4)
    assert torch.allclose(cli.model.criterion.margins, expected, atol=1e-6)


def test_ce_config(tiny_cifar10):
    cli = instantiate("cifar10_lt_ce.yaml", tiny_cifar10)
    assert isinstance(cli.model.criterion, torch.nn.CrossEntropyLoss)
    assert isinstance(cli.model.backbone.linear, torch.nn.Linear)
    assert not any(isinstance(cb, DeferredReweighting) for cb in cli.trainer.callbacks)


def test_documented_fit_command_runs(tiny_cifar10, tmp_path, monkeypatch):
    # `lightning-reweight fit --config ...` (on top of the package's default digits config), one batch
    from lightning_reweight.cli import main

    monkeypatch.chdir(tmp_path)
    config = resources.files("lightning_reweight") / "configs" / "cifar10_lt_ldam_drw.yaml"
    assert main(["fit", "--config", str(config), "--data.init_args.data_dir", str(tiny_cifar10),
                 "--data.init_args.verify_checksums", "false", "--data.init_args.num_workers", "0",
                 "--data.init_args.imbalance_ratio", "1.0", "--data.init_args.batch_size", "16",
                 "--trainer.accelerator", "cpu", "--trainer.fast_dev_run", "true"]) == 0
