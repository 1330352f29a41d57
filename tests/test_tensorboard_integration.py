"""One short training with a TensorBoardLogger, its event file read back with TensorBoard's own reader."""

import lightning as L
import pytest
import torch
from logging_data import NoisyBlobs, ParityWeights

from lightning_reweight.callbacks import SusceptibilityMonitor
from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.models import MLP

pytest.importorskip("tensorboard")


def test_event_file_holds_scalars_and_histograms(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    monitor = SusceptibilityMonitor(batch_size=16)
    torch.manual_seed(0)
    model = ReweightClassifier(MLP(5, 3, hidden=(16,)), num_classes=3, lr=0.1)
    model.attach_weighting("w", ParityWeights())
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=logger, callbacks=[monitor], log_every_n_steps=2,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(model, datamodule=NoisyBlobs())
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    zetas = [e.value for e in events.Scalars("memorization/zeta")]
    expected = [sum(d for _, d in monitor.history[: i + 1]) / (i + 1) for i in range(3)]
    assert zetas == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32
    # weights 1 (even index, noisy) and 2 (odd): the batch mean is 1 + (share of odd indices)
    assert "weights/mean" in tags["scalars"] and "weights/ess" in tags["scalars"]
    steps = [e.step for e in events.Scalars("weights/mean")]
    assert steps == [s for s in range(12) if (s + 1) % 2 == 0]  # 4 batches x 3 epochs, written every 2nd step
    assert "memorization/weights_clean" in tags["histograms"]
    clean = events.Histograms("memorization/weights_clean")
    assert len(clean) == 3
    for event in clean:  # every clean (odd-index) sample once per epoch, all with weight 2
        assert event.histogram_value.num == 32
        assert event.histogram_value.min == event.histogram_value.max == 2.0
    # epoch-end values sit at Lightning's own epoch-end step (the epoch's last batch: 3, 7, 11), not one after it
    epoch_end = [e.step for e in events.Scalars("train/loss")]
    assert epoch_end == [3, 7, 11]
    assert [e.step for e in clean] == epoch_end
    assert [e.step for e in events.Scalars("memorization/weight_mean_clean")] == epoch_end
