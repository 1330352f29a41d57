"""Test accuracy after every training epoch, for the best-epoch figures the papers report.

The papers behind the meta-reweighting methods select the epoch with the best test accuracy; the benchmark
reports the last epoch and the best epoch both. Watching the test set is only for that comparison: it does not
steer training (no early stopping, no checkpoint choice).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning_reweight._modes import eval_mode
from lightning_reweight.contract import split_batch

__all__ = ["TestCurve"]


class TestCurve(Callback):
    """Evaluate accuracy and balanced accuracy on the datamodule's test set at the end of every training epoch.

    The test set is read once at the start of fit; every evaluation runs in eval mode, without gradients and with
    the random number generators restored afterwards, so a run with the callback trains exactly as one without.
    Balanced accuracy is the mean recall over the classes present in the test set.

    Example:
        >>> curve = TestCurve()
        >>> curve.best() is None
        True
    """

    __test__ = False  # not a pytest test class

    def __init__(self, batch_size: int = 1024) -> None:
        self.batch_size = batch_size
        self.acc: list[float] = []
        self.balanced_acc: list[float] = []
        self._data: tuple[Tensor, Tensor] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set at runtime by Lightning
        if dm is None or not hasattr(dm, "test_dataloader"):
            raise ValueError("TestCurve needs a datamodule with a test_dataloader")
        with torch.random.fork_rng(devices=[]):  # creating the loader's iterator draws a seed
            xs, ys = zip(*(split_batch(b)[:2] for b in dm.test_dataloader()))
        self._data = (torch.cat(xs), torch.cat(ys))

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._data is not None
        x_all, y_all = self._data
        with eval_mode(pl_module), torch.random.fork_rng(devices=[]):
            preds = torch.cat([
                pl_module(x_all[i : i + self.batch_size].to(pl_module.device)).argmax(dim=1).cpu()
                for i in range(0, x_all.shape[0], self.batch_size)
            ])
        # float64 counts, not metrics.BalancedAccuracy (float32 mean): the benchmark JSON files were written with these
        correct = (preds == y_all).double()
        per_class_total = torch.bincount(y_all).double()
        per_class_hits = torch.bincount(y_all, weights=correct, minlength=per_class_total.numel())
        present = per_class_total > 0
        self.acc.append(100.0 * float(correct.mean()))
        self.balanced_acc.append(100.0 * float((per_class_hits[present] / per_class_total[present]).mean()))

    def best(self) -> dict[str, Any] | None:
        """``best_test_acc``, ``best_test_balanced_acc`` (%, each the maximum over epochs) and the epoch of each."""
        if not self.acc:
            return None
        ea = max(range(len(self.acc)), key=self.acc.__getitem__)
        eb = max(range(len(self.balanced_acc)), key=self.balanced_acc.__getitem__)
        return {
            "best_test_acc": self.acc[ea],
            "best_epoch": ea,
            "best_test_balanced_acc": self.balanced_acc[eb],
            "best_balanced_epoch": eb,
        }
