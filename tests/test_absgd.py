import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_reweight import ReweightClassifier
from lightning_reweight.callbacks import DROSchedule
from lightning_reweight.losses import AttentionalDROLoss
from lightning_reweight.models import MLP


def ce(logits, y):
    return nn.functional.cross_entropy(logits.float(), y, reduction="none")


def written_out_softmax_loss(losses, lam):
    e = [math.exp(v / lam) for v in losses]
    return sum(ei / sum(e) * li for ei, li in zip(e, losses))


@pytest.mark.parametrize("lam", [2.0, 0.5, -1.0])
def test_closed_form_gamma1_alpha1(lam):
    torch.manual_seed(0)
    crit = AttentionalDROLoss(lam=lam, gamma=1.0, alpha=1.0)
    for _ in range(3):  # no memory: every batch is its own softmax
        logits, y = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
        expected = written_out_softmax_loss(ce(logits, y).tolist(), lam)
        assert math.isclose(float(crit(logits, y)), expected, rel_tol=1e-5)


def test_moving_average_started_at_first_batch():
    torch.manual_seed(1)
    lam, gamma, alpha = 2.0, 0.7, 0.5
    crit = AttentionalDROLoss(lam=lam, gamma=gamma, alpha=alpha)
    u = None
    for _ in range(5):
        logits, y = torch.randn(12, 4) * 2, torch.randint(0, 4, (12,))
        losses = ce(logits, y).tolist()
        m = sum(math.exp(v / lam) for v in losses) / len(losses)
        u = alpha * m if u is None else (1 - gamma) * u + gamma * alpha * m
        expected = sum(math.exp(v / lam) / (u * len(losses)) * v for v in losses)
        assert math.isclose(float(crit(logits, y)), expected, rel_tol=1e-5)
        assert math.isclose(float(crit.u), u, rel_tol=1e-5)


def test_class_weights_inside_the_exponential():
    torch.manual_seed(2)
    c = torch.tensor([0.5, 1.0, 3.0])
    crit = AttentionalDROLoss(lam=1.0, gamma=1.0, base_loss=nn.CrossEntropyLoss(weight=c, reduction="none"))
    logits, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    weighted = [float(c[t]) * v for t, v in zip(y.tolist(), ce(logits, y).tolist())]
    assert math.isclose(float(crit(logits, y)), written_out_softmax_loss(weighted, 1.0), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.1, -0.1])
def test_no_inf_nan_with_large_losses(dtype, lam):
    crit = AttentionalDROLoss(lam=lam, gamma=0.9)
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        losses = (torch.rand(32, generator=gen) * 100).to(dtype)
        losses[0] = 100.0 if step % 2 else 0.0
        losses.requires_grad_(True)
        w = crit.sample_weights(losses)
        loss = (w.to(losses.dtype) * losses).mean()
        loss.backward()
        assert w.dtype == torch.float32
        assert torch.isfinite(w).all() and torch.isfinite(loss) and torch.isfinite(losses.grad).all()
        assert torch.isfinite(crit.log_u) and torch.isfinite(crit.last_objective)
        assert (w >= 0).all()


def test_low_precision_logits_route():
    crit = AttentionalDROLoss(lam=0.1)
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(8, 10) * 60).to(dtype).requires_grad_(True)  # CE losses in the tens
        loss = crit(logits, torch.randint(0, 10, (8,)))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_buffers_keep_no_graph():
    model = nn.Linear(6, 3)
    crit = AttentionalDROLoss(lam=1.0, gamma=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    for name, buf in crit.named_buffers():
        assert not buf.requires_grad and buf.grad_fn is None, name
    assert crit.last_objective.grad_fn is None


def test_lam_none_is_plain_ce_and_leaves_u():
    crit = AttentionalDROLoss(lam=None)
    logits, y = torch.randn(9, 4), torch.randint(0, 4, (9,))
    assert torch.allclose(crit(logits, y), nn.functional.cross_entropy(logits, y))
    assert torch.equal(crit.sample_weights(ce(logits, y)), torch.ones(9))
    assert not bool(crit.initialised) and float(crit.log_u) == 0.0


def test_negative_lam_downweights_high_losses():
    crit = AttentionalDROLoss(lam=-1.0)
    w = crit.sample_weights(torch.tensor([0.1, 1.0, 4.0, 0.5]))
    assert w[0] > w[3] > w[1] > w[2]
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-5)  # first batch: u = its own statistic


def test_eval_mode_does_not_update_and_lam_change_reinitialises():
    crit = AttentionalDROLoss(lam=1.0, gamma=0.5)
    crit.sample_weights(torch.tensor([1.0, 2.0]))
    log_u = crit.log_u.clone()
    crit.eval()
    crit.sample_weights(torch.tensor([5.0, 9.0]))
    assert torch.equal(crit.log_u, log_u)
    crit.train()
    crit.lam = 0.5
    crit.sample_weights(torch.tensor([3.0, 4.0]))
    expected = math.log((math.exp(6.0) + math.exp(8.0)) / 2)  # fresh start from this batch, lam = 0.5
    assert math.isclose(float(crit.log_u), expected, rel_tol=1e-6)


def test_eval_mode_weights_use_the_current_u_as_is():
    """exp(l / lam) / u with the u of the training steps (it used to be u moved by the eval batch, unsaved)."""
    crit = AttentionalDROLoss(lam=1.0, gamma=0.5)
    crit.sample_weights(torch.tensor([0.1, 0.2, 0.3]))
    u = (math.exp(0.1) + math.exp(0.2) + math.exp(0.3)) / 3
    crit.eval()
    w = crit.sample_weights(torch.tensor([3.0, 4.0]))
    assert w.tolist() == pytest.approx([math.exp(3.0) / u, math.exp(4.0) / u], rel=1e-6)
    fresh = AttentionalDROLoss(lam=1.0, gamma=0.5).eval()  # no u yet: the batch's own normalisation
    assert fresh.sample_weights(torch.tensor([3.0, 4.0])).tolist() == pytest.approx(
        [2 * math.exp(3.0) / (math.exp(3.0) + math.exp(4.0)), 2 * math.exp(4.0) / (math.exp(3.0) + math.exp(4.0))])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_batch_leaves_u_as_it_was(bad):
    """One inf/nan loss (an fp16 overflow the GradScaler skips) used to make u nan for the rest of the run."""
    lam, gamma = 2.0, 0.5
    crit = AttentionalDROLoss(lam=lam, gamma=gamma)
    crit.sample_weights(torch.tensor([bad, 1.0]))  # as the first batch: u does not start from it
    assert not bool(crit.initialised)
    crit.sample_weights(torch.tensor([1.0, 3.0]))
    u = (math.exp(0.5) + math.exp(1.5)) / 2
    crit.sample_weights(torch.tensor([0.5, bad]))  # later: u keeps its value
    assert float(crit.u) == pytest.approx(u, rel=1e-6)
    crit.sample_weights(torch.tensor([2.0, 2.0]))
    assert float(crit.u) == pytest.approx((1 - gamma) * u + gamma * math.exp(1.0), rel=1e-6)
    with pytest.raises(ValueError, match="empty batch"):
        crit.sample_weights(torch.zeros(0))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="gamma"):
        AttentionalDROLoss(gamma=0.0)
    with pytest.raises(ValueError, match="alpha"):
        AttentionalDROLoss(alpha=0.0)
    with pytest.raises(ValueError, match="lam"):
        AttentionalDROLoss(lam=0.0)
    with pytest.raises(ValueError, match="reduction"):
        AttentionalDROLoss(base_loss=nn.CrossEntropyLoss())


def test_state_dict_round_trip():
    a = AttentionalDROLoss(lam=1.0, gamma=0.6)
    a.sample_weights(torch.tensor([1.0, 3.0, 0.2]))
    b = AttentionalDROLoss(lam=1.0, gamma=0.6)
    b.load_state_dict(a.state_dict())
    nxt = torch.tensor([2.0, 0.1, 0.4])
    assert torch.allclose(a.sample_weights(nxt), b.sample_weights(nxt))


def test_state_dict_round_trip_keeps_u_for_a_lam_float32_cannot_hold():
    """u_lam is a float32 buffer: after a load it reads 0.30000001, and u must still continue, not restart."""
    batches = [torch.tensor([1.0, 3.0, 0.2]), torch.tensor([0.5, 2.5, 0.1]), torch.tensor([2.0, 0.1, 0.4])]
    a = AttentionalDROLoss(lam=0.3, gamma=0.5)
    for losses in batches[:2]:
        a.sample_weights(losses)
    b = AttentionalDROLoss(lam=0.3, gamma=0.5)
    b.load_state_dict(a.state_dict())
    m = float(torch.exp(batches[2] / 0.3).mean())  # u <- (1 - gamma) u + gamma m: the recurrence, continued
    expected_u = 0.5 * float(a.u) + 0.5 * m
    b.sample_weights(batches[2])
    assert float(b.u) == pytest.approx(expected_u, rel=1e-5)
    assert float(b.u) != pytest.approx(m, rel=1e-3)  # a restart would set u to this batch's m


def test_buffers_stay_float32_under_bf16_true():
    """precision="bf16-true" casts the module: u must not be rounded to bf16 (step 0.25 at log u ~ 50)."""
    a = AttentionalDROLoss(lam=0.3, gamma=0.5)
    a.sample_weights(torch.tensor([15.0, 14.9, 15.1]))
    log_u = a.log_u.clone()
    b = a.to(torch.bfloat16)
    assert b.log_u.dtype == torch.float32 and torch.equal(b.log_u, log_u)
    assert b.u_lam.dtype == torch.float32
    assert b.initialised.dtype == torch.bool


def test_classifier_route_updates_u_once_per_step():
    torch.manual_seed(4)
    lam, gamma = 1.0, 0.5
    backbone = MLP(6, 3, hidden=(8,))
    model = ReweightClassifier(backbone, 3, criterion=AttentionalDROLoss(lam=lam, gamma=gamma))
    u = None
    for _ in range(3):
        batch = (torch.randn(10, 6), torch.randint(0, 3, (10,)), torch.arange(10))
        with torch.no_grad():
            losses = ce(backbone(batch[0]), batch[1]).tolist()
        m = sum(math.exp(v / lam) for v in losses) / len(losses)
        u = m if u is None else (1 - gamma) * u + gamma * m
        loss = model.training_step(batch, 0)
        expected = sum(math.exp(v / lam) / (u * len(losses)) * v for v in losses)
        assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5)
        assert math.isclose(float(model.criterion.u), u, rel_tol=1e-5)


def test_schedule_lam_at_and_validation():
    cb = DROSchedule(start_epoch=2, lam=-3.0, lam_schedule={5: -1.0})
    assert [cb.lam_at(e) for e in range(7)] == [None, None, -3.0, -3.0, -3.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="start_epoch"):
        DROSchedule(start_epoch=3, lam_schedule={1: 2.0})
    with pytest.raises(ValueError, match="non-zero"):
        DROSchedule(lam=0.0)
    for bad in (float("nan"), float("inf")):  # accepted before, then failed when start_epoch came (hours in)
        with pytest.raises(ValueError, match="finite non-zero"):
            DROSchedule(start_epoch=160, lam=bad)
        with pytest.raises(ValueError, match="finite non-zero"):
            DROSchedule(start_epoch=160, lam=1.0, lam_schedule={180: bad})
    plain = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3)
    with pytest.raises(ValueError, match="AttentionalDROLoss"):
        DROSchedule().setup(None, plain, "fit")


def test_schedule_without_lam_takes_the_losss_own():
    """DROSchedule's default lam was 1.0: AttentionalDROLoss(lam=-3.0) + DROSchedule(start_epoch=1) trained with
    lam = +1 from epoch 1 (the label-noise setting's sign flipped), without a word."""
    seen = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.criterion.lam)

    def fit(criterion, schedule):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=criterion, lr=0.1)
        L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  callbacks=[schedule, Record()]).fit(model, _loader())

    fit(AttentionalDROLoss(lam=-3.0), DROSchedule(start_epoch=1))
    assert seen == [None, -3.0, -3.0]
    with pytest.raises(ValueError, match=r"DROSchedule\(lam=...\)"):
        fit(AttentionalDROLoss(lam=None), DROSchedule(start_epoch=1))
    seen.clear()
    with pytest.warns(UserWarning, match="of the other sign"):
        fit(AttentionalDROLoss(lam=-3.0), DROSchedule(start_epoch=1, lam=2.0))
    assert seen == [None, 2.0, 2.0]


def test_schedule_without_lam_follows_the_built_lam_across_fits_resumes_and_evaluation(tmp_path):
    """The loss's lam is the schedule's to change: a second fit with a new DROSchedule() read the lam the first
    schedule had left (its last lam_schedule value, or None after an ERM-only fit), a resumed run of a loss built
    with lam=None failed although the checkpoint holds the resolved lam, and trainer.validate raised."""
    seen = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.criterion.lam)

    def trainer_(epochs, callbacks, **kw):
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[*callbacks, Record()], **kw)

    torch.manual_seed(0)
    model = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=5.0), lr=0.1)
    trainer_(3, [DROSchedule(start_epoch=1, lam_schedule={2: 0.5})], enable_checkpointing=False).fit(model, _loader())
    assert seen == [None, 5.0, 0.5] and model.criterion.lam == 0.5
    seen.clear()
    trainer_(2, [DROSchedule(start_epoch=1)], enable_checkpointing=False).fit(model, _loader())  # refit
    assert seen == [None, 5.0]
    seen.clear()
    trainer_(1, [DROSchedule(start_epoch=5)], enable_checkpointing=False).fit(model, _loader())  # ends in ERM
    trainer_(2, [DROSchedule(start_epoch=1)], enable_checkpointing=False).fit(model, _loader())
    assert seen == [None, None, 5.0]
    trainer_(1, [DROSchedule()], enable_checkpointing=False).validate(model, _loader(), verbose=False)
    # one callback object reused for another module: each fit takes that module's built lam
    seen.clear()
    schedule = DROSchedule(start_epoch=1)
    for lam in (4.0, -4.0):
        other = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=lam), lr=0.1)
        trainer_(2, [schedule], enable_checkpointing=False).fit(other, _loader())
    assert seen == [None, 4.0, None, -4.0]
    # resume: the first run resolved lam from its loss; the resumed module's loss was built with lam=None
    seen.clear()
    torch.manual_seed(0)
    first = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=-2.0), lr=0.1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    trainer_(2, [DROSchedule(start_epoch=1), ckpt]).fit(first, _loader())
    second = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=None), lr=0.1)
    trainer_(3, [DROSchedule(start_epoch=1)], enable_checkpointing=False).fit(
        second, _loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert seen == [None, -2.0, -2.0]


# ---------------------------------------------------------------------------------------------- resume
def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return DataLoader(TensorDataset(x, y), batch_size=40, shuffle=False)


def _fit(max_epochs, root, ckpt_path=None, model=None):
    torch.manual_seed(0)
    model = model or ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=None, gamma=0.7),
                                        lr=0.1)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, log_every_n_steps=1,
                        # 0.3 is not a float32 value: u must still be found to belong to it after the resume
                        callbacks=[DROSchedule(start_epoch=1, lam=0.3, lam_schedule={3: 0.8})])
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return model, trainer


def test_resume_gives_same_u_and_weights(tmp_path):
    straight, trainer = _fit(4, tmp_path / "a")
    metrics = trainer.callback_metrics
    assert float(metrics["absgd/lam"]) == pytest.approx(0.8)
    assert torch.isclose(metrics["absgd/dro_objective"], straight.criterion.last_objective)
    assert torch.equal(metrics["absgd/log_u"], straight.criterion.log_u)
    first, trainer = _fit(2, tmp_path / "b")
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    assert "log_u" in "".join(torch.load(path, weights_only=True)["state_dict"])
    resumed, _ = _fit(4, tmp_path / "c", ckpt_path=str(path))
    assert resumed.criterion.lam == straight.criterion.lam == 0.8
    assert bool(resumed.criterion.initialised)
    assert torch.allclose(resumed.criterion.log_u, straight.criterion.log_u, atol=1e-6)
    assert torch.allclose(resumed.last_sample_weights, straight.last_sample_weights, atol=1e-5)
    assert not torch.allclose(straight.last_sample_weights, torch.ones(40))  # the DRO stage did reweight


@pytest.mark.parametrize("step", [4, 6, 8])  # epoch 0's last batch, epoch 1's middle, epoch 1's last batch
def test_absgd_lam_is_logged_for_the_epoch_a_run_resumes_into(tmp_path, step):
    """``absgd/lam`` was logged in the epoch-start hook, which Lightning skips for the epoch a checkpoint from an
    epoch's last batch or middle resumes into: that epoch had no value in the logs (and from epoch 1's last batch
    no row at all)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    def run(root, ckpt=None):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=None), lr=0.1)
        schedule = DROSchedule(start_epoch=1, lam=0.3, lam_schedule={3: 0.8})
        saving = [ModelCheckpoint(dirpath=root / "ck", filename="{step}", every_n_train_steps=step, save_top_k=-1)]
        trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=CSVLogger(root), log_every_n_steps=1,
                            callbacks=[schedule] + (saving if ckpt is None else []), enable_checkpointing=ckpt is None,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, _loader(), ckpt_path=ckpt)
        with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
            return {int(r["epoch"]): float(r["absgd/lam"]) for r in csv.DictReader(f) if r.get("absgd/lam")}, schedule

    straight, schedule = run(tmp_path / "a")
    expected = {e: float("nan") if schedule.lam_at(e) is None else schedule.lam_at(e) for e in range(4)}  # ERM: nan
    assert straight.keys() == expected.keys() and [expected[e] for e in (1, 2, 3)] == [0.3, 0.3, 0.8]
    assert all(straight[e] == pytest.approx(v, nan_ok=True) for e, v in expected.items())
    resumed, _ = run(tmp_path / "b", str(tmp_path / "a" / "ck" / f"step={step}.ckpt"))
    first = step // 4  # the epoch the resumed run begins with (4 batches per epoch)
    assert sorted(resumed) == list(range(first, 4))
    assert all(resumed[e] == pytest.approx(expected[e], nan_ok=True) for e in resumed)


# ---------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    from lightning_reweight.losses import AttentionalDROLoss

    def main(rank, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.manual_seed(0)
        model = nn.Linear(5, 3)  # same init on both ranks
        crit = AttentionalDROLoss(lam=0.7, gamma=0.6, alpha=0.8)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(100 + rank)  # different data per rank
        history = []
        for step in range(4):
            n = 6 + 3 * rank  # different batch sizes too
            x, y = torch.randn(n, 5, generator=g) * (1 + rank), torch.randint(0, 3, (n,), generator=g)
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            history.append(losses.detach().tolist())
            opt.zero_grad()
            (crit.sample_weights(losses) * losses).mean().backward()
            for p in model.parameters():  # keep replicas identical, as DDP would
                dist.all_reduce(p.grad)
                p.grad /= 2
            opt.step()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"log_u": float(crit.log_u), "history": history}, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        # fork: the children reuse the parent's imports (spawn would import torch and lightning twice more)
        torch.multiprocessing.start_processes(main, args=(port, out), nprocs=2, start_method="fork")
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_u_identical_and_global(tmp_path):
    script = tmp_path / "ddp_absgd.py"
    script.write_text(_DDP_SCRIPT)
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], check=True, env=env, timeout=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["log_u"] == r1["log_u"]
    # reference: the moving average of the statistic over the union of both ranks' batches
    lam, gamma, alpha = 0.7, 0.6, 0.8
    u = None
    for l0, l1 in zip(r0["history"], r1["history"]):
        both = l0 + l1
        m = sum(math.exp(v / lam) for v in both) / len(both)
        u = alpha * m if u is None else (1 - gamma) * u + gamma * alpha * m
    assert math.isclose(r0["log_u"], math.log(u), rel_tol=1e-5)


class _RecordLogU(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        crit = pl_module.criterion
        path = os.path.join(self.out, f"lightning_rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"log_u": float(crit.log_u), "lam": crit.lam, "w": pl_module.last_sample_weights.tolist()}, f)


@pytest.mark.ddp
def test_lightning_ddp_contract_route(tmp_path):
    # the ReweightClassifier route under a real Lightning DDP run: 2 CPU processes (forked), DistributedSampler
    # gives each rank different samples; u must end identical on both ranks
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=None, gamma=0.7), lr=0.1)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[DROSchedule(start_epoch=1, lam=0.5), _RecordLogU(str(tmp_path))])
    trainer.fit(model, _loader())
    r0, r1 = (json.loads((tmp_path / f"lightning_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["lam"] == r1["lam"] == 0.5
    assert r0["log_u"] == r1["log_u"]
    assert r0["w"] != r1["w"]  # different data per rank, same normaliser


def test_bf16_mixed_trainer(tmp_path):
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(6, 3, hidden=(8,)), 3, criterion=AttentionalDROLoss(lam=0.1), lr=0.1)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, _loader())
    crit = model.criterion
    assert crit.log_u.dtype == torch.float32 and torch.isfinite(crit.log_u)
    assert torch.isfinite(model.last_sample_weights).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- review of the losses as a user


def test_an_erm_stage_ends_u_run_even_when_the_same_lam_returns():
    """lam -> None -> lam kept the first stage's u: the first weights of the new DRO stage were scaled by the ratio
    of the old statistic to the new one (a second fit, or fine-tuning a DRO checkpoint with an ERM warm-up)."""
    crit = AttentionalDROLoss(lam=1.0, gamma=0.45)
    crit.sample_weights(torch.full((8,), 0.05))  # the earlier DRO stage: small losses
    crit.lam = None
    crit.sample_weights(torch.full((8,), 2.0))  # an ERM training step
    state = {k: v.clone() for k, v in crit.state_dict().items()}
    crit.lam = 1.0
    w = crit.sample_weights(torch.tensor([1.0, 2.0, 3.0]))
    # a fresh u is this batch's own statistic: the weights are exactly softmax(l) * B, mean 1
    expected = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0) * 3
    assert torch.allclose(w, expected, rtol=1e-6)
    # the mark is in the buffers: a checkpoint taken after the ERM steps resumes into a fresh start too
    resumed = AttentionalDROLoss(lam=1.0, gamma=0.45)
    resumed.load_state_dict(state)
    assert torch.allclose(resumed.sample_weights(torch.tensor([1.0, 2.0, 3.0])), expected, rtol=1e-6)
    # an ERM step in eval mode (validation) leaves u's run alone
    crit = AttentionalDROLoss(lam=1.0, gamma=0.5)
    crit.sample_weights(torch.tensor([0.0, 0.0]))  # u = 1
    crit.eval()
    crit.lam = None
    crit.sample_weights(torch.full((2,), 5.0))
    crit.train()
    crit.lam = 1.0
    crit.sample_weights(torch.tensor([1.0, 1.0]))
    assert float(crit.u) == pytest.approx(0.5 * 1.0 + 0.5 * math.e, rel=1e-6)


def test_torch_compile_follows_a_lam_schedule():
    """A compiled loss crashed at the second change of lam (Dynamo traced the float32 rounding of lam)."""
    torch.manual_seed(0)
    crit, ref = AttentionalDROLoss(lam=None, gamma=0.9), AttentionalDROLoss(lam=None, gamma=0.9)
    compiled = torch.compile(crit, backend="eager")
    for lam in [None, 1.0, 1.0, 2.0, 0.3, None, 0.3]:
        crit.lam = ref.lam = lam
        logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
        assert torch.allclose(compiled(logits, y), ref(logits, y), rtol=1e-6)


def test_shape_errors_name_the_expected_shapes_and_soft_targets_work():
    crit = AttentionalDROLoss(lam=1.0, gamma=1.0)
    with pytest.raises(ValueError, match=r"targets of shape \(B,\)"):
        crit(torch.randn(4), torch.tensor(1))
    # probability targets (mixup, label smoothing by hand) are the base loss's business: softmax(l) weighting
    logits, soft = torch.randn(6, 3), torch.softmax(torch.randn(6, 3), 1)
    losses = nn.functional.cross_entropy(logits, soft, reduction="none")
    assert torch.allclose(crit(logits, soft), (torch.softmax(losses, 0) * losses).sum())


def test_sync_dist_false_under_a_process_group_warns(tmp_path):
    """Under Lightning's DDP the buffer broadcast resets every rank's u to rank 0's before each step, so
    sync_dist=False gives a hybrid u; the loss now says so when it first updates u inside a process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        crit = AttentionalDROLoss(lam=1.0, sync_dist=False)
        with pytest.warns(UserWarning, match=r"sync_dist=False\) under DDP"):
            crit.sample_weights(torch.tensor([1.0, 2.0]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            crit.sample_weights(torch.tensor([1.0, 2.0]))  # once
            AttentionalDROLoss(lam=1.0).sample_weights(torch.tensor([1.0, 2.0]))  # the default is silent
    finally:
        dist.destroy_process_group()
