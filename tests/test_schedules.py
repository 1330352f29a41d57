import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import ReweightClassifier
from lightning_reweight.models import MLP
from lightning_reweight.schedules import warmup_multistep, warmup_multistep_factor


def expected_lr(base, epoch, warmup, milestones, gamma):
    # written out: linear ramp (epoch+1)/warmup during warm-up, then gamma per milestone reached
    if epoch < warmup:
        return base * (epoch + 1) / warmup
    lr = base
    for m in milestones:
        if epoch >= m:
            lr *= gamma
    return lr


def test_lambda_lr_values_per_epoch_cifar_recipe():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = warmup_multistep(opt, warmup_epochs=5, milestones=(160, 180), gamma=0.01)
    for epoch in range(200):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr(0.1, epoch, 5, (160, 180), 0.01), rel=1e-9)
        opt.step()
        sched.step()
    assert warmup_multistep_factor(5, (160, 180), 0.01)(159) == 1.0


def test_no_warmup_is_multistep():
    f = warmup_multistep_factor(0, (2, 4), 0.1)
    assert [f(e) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_multistep_factor(-1)
    with pytest.raises(ValueError, match="gamma"):
        warmup_multistep_factor(5, (1,), 0.0)
    with pytest.raises(ValueError, match="scheduler"):
        ReweightClassifier(MLP(64, 4, hidden=(8,)), 4, scheduler="warmup")


def test_classifier_option_lr_per_epoch():
    lrs = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = ReweightClassifier(MLP(64, 4, hidden=(8,)), 4, lr=0.2, scheduler="warmup_multistep",
                               warmup_epochs=3, milestones=(4, 6), gamma=0.1)
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))), batch_size=8)
    trainer = L.Trainer(max_epochs=7, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(model, data)
    assert lrs == pytest.approx([expected_lr(0.2, e, 3, (4, 6), 0.1) for e in range(7)])


def test_defaults_are_the_ldam_drw_cifar_recipe():
    """Cao et al. (2019), CIFAR: 5 warm-up epochs, then the lr x 0.01 at epoch 160 and again at 180 (200 epochs)."""
    f = warmup_multistep_factor()
    assert [f(e) for e in range(200)] == pytest.approx([expected_lr(1.0, e, 5, (160, 180), 0.01) for e in range(200)])
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = warmup_multistep(opt)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([expected_lr(0.1, e, 5, (160, 180), 0.01) for e in range(200)], rel=1e-9)
