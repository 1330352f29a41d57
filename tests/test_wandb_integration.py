"""One short training with an offline W&B run, read back from its transaction log (.wandb)."""

import json
import struct
import time

import lightning as L
import pytest
import torch
from logging_data import NoisyBlobs as _DM
from logging_data import ParityWeights as _Weights

from lightning_reweight.callbacks import SusceptibilityMonitor
from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.models import MLP

wandb = pytest.importorskip("wandb")


def offline_records(run_file):
    """Yield the records of an offline W&B run.

    The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic, version), then 32 KiB blocks of
    records, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) and a
    serialised ``wandb.proto.wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            pos += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _items(items):
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_history(run_file):
    """The history rows of an offline W&B run."""
    return [_items(r.history.item) for r in offline_records(run_file) if r.WhichOneof("record_type") == "history"]


def _wait_for_history(root, key, count, timeout=60.0):
    """The offline run's history rows, re-read until ``count`` rows hold ``key`` or ``timeout`` seconds pass.

    ``wandb.finish()`` hands the last records to W&B's writer process; on a heavily loaded machine the file can
    lag behind it for a moment (seen once in a full run next to four other jobs).
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(root.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        rows = read_offline_history(files[0]) if files else []
        if sum(key in r for r in rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_offline_run_contains_memorization_keys(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lr-test")
    monitor = SusceptibilityMonitor(batch_size=16)
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(5, 3, hidden=(16,)), num_classes=3, lr=0.1)
    model.attach_weighting("w", _Weights())
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(model, datamodule=_DM())
    finally:
        wandb.finish()
    rows = _wait_for_history(tmp_path, key="memorization/drop", count=3)
    drops = [(r["epoch"], r["memorization/drop"]) for r in rows if "memorization/drop" in r]
    assert [e for e, _ in drops] == [0, 1, 2]
    assert [d for _, d in drops] == pytest.approx([d for _, d in monitor.history])
    zetas = [r["memorization/zeta"] for r in rows if "memorization/zeta" in r]
    expected = [sum(d for _, d in monitor.history[: i + 1]) / (i + 1) for i in range(3)]
    assert zetas == pytest.approx(expected)
    assert any("memorization/train_acc_noisy" in r for r in rows)
    means = [r["memorization/weight_mean_noisy"] for r in rows if "memorization/weight_mean_noisy" in r]
    assert means == pytest.approx([1.0] * 3)  # even indices are the noisy ones and get weight 1
    hists = [r for r in rows if r.get("memorization/weights_clean/_type") == "histogram"]
    assert len(hists) == 3
    assert sum(hists[0]["memorization/weights_clean/values"]) == 32  # one epoch sees every clean sample once
    # every memorization/ key is plotted against the epoch: defined by its exact name (W&B tied keys to a
    # "memorization/*" pattern or to WandbLogger's own "*" at random), and every row holding one carries its epoch
    # (the histograms' rows had none)
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    metrics = [r.metric for r in offline_records(files[0]) if r.WhichOneof("record_type") == "metric"]
    on_epoch = {m.name for m in metrics if m.step_metric == "epoch"}
    logged = {k.split("/_type")[0] for r in rows for k in r if k.startswith("memorization/") and "/" in k}
    logged = {k.rsplit("/", 1)[0] if k.count("/") > 1 else k for k in logged}
    assert logged and logged <= on_epoch and not any(m.glob_name.startswith("memorization") for m in metrics)
    assert [r["epoch"] for r in hists] == [0, 1, 2]
    assert all("epoch" in r for r in rows if any(k.startswith("memorization/") for k in r))
    # an epoch's end values in one row (the subset accuracies and the weight means came in two)
    assert all("memorization/train_acc_noisy" in r for r in rows if "memorization/weight_mean_noisy" in r)


def read_offline_config(run_file):
    """The config updates of an offline W&B run (same record log as the history)."""
    config = {}
    for record in offline_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update(_items(record.config.update))
    return config


def test_cli_run_records_criterion_and_callbacks_in_the_wandb_config(tmp_path, monkeypatch):
    """The model's hyperparameters leave the criterion out: the CLI puts the whole parsed config into the run."""
    from lightning_reweight.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline=true",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--model.criterion=lightning_reweight.losses.AttentionalDROLoss", "--model.criterion.init_args.lam=-1.0",
            "--trainer.callbacks+=lightning_reweight.callbacks.DROSchedule"]
    try:
        assert main(argv) == 0
    finally:
        wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while "cli" not in (config := read_offline_config(run_file)) and time.monotonic() < deadline:
        time.sleep(0.5)
    cli = config["cli"]["value"] if "value" in config["cli"] else config["cli"]
    assert cli["model"]["criterion"]["class_path"] == "lightning_reweight.losses.AttentionalDROLoss"
    assert cli["model"]["criterion"]["init_args"]["lam"] == -1.0
    assert any(cb["class_path"] == "lightning_reweight.callbacks.DROSchedule" for cb in cli["trainer"]["callbacks"])
