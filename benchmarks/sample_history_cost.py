"""What MetaReweight's per-sample weight history costs per meta step (digits-sym40, L2RW, finite difference).

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/sample_history_cost.py

Two routes, in one process, on one CPU thread:

- direct: every ``SampleWeightHistory.update`` call inside the Trainer is timed (median ms), and set against the
  median training step of the same run (the stable figure on a shared machine);
- whole steps: runs with ``track_sample_history`` on and off, interleaved (order alternating per repeat), median
  step time of each (batch start to batch end, first 20 steps of each run skipped); their ratio carries the
  machine's run-to-run noise of several percent.

Writes ``benchmarks/results/sample_history_cost.json`` (about a minute and a half).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_reweight.bench.runner import make_datamodule, make_trainer, quiet  # noqa: E402
from lightning_reweight.bench.scenarios import SCENARIOS  # noqa: E402
from lightning_reweight.callbacks import MetaReweight  # noqa: E402
from lightning_reweight.classifier import ReweightClassifier  # noqa: E402
from lightning_reweight.meta import L2RW  # noqa: E402
from lightning_reweight.metrics import SampleWeightHistory  # noqa: E402
from lightning_reweight.models import MLP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIP = 20  # first steps of each run left out (caches, the history's allocation)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


class TimedHistory(SampleWeightHistory):
    """The metric with its ``update`` calls timed."""

    calls: list[float] = []

    def update(self, weights, indices):
        start = time.perf_counter()
        super().update(weights, indices)
        TimedHistory.calls.append(time.perf_counter() - start)


def fit(track: bool, epochs: int) -> list[float]:
    sc = SCENARIOS["digits-sym40"]
    recipe = sc.recipe
    L.seed_everything(0, verbose=False)
    dm = make_datamodule(sc, 0)
    model = ReweightClassifier(MLP(64, dm.num_classes, hidden=recipe.hidden), dm.num_classes, lr=recipe.lr,
                               momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    timer = StepTimer()
    trainer = make_trainer(epochs, [MetaReweight(L2RW(), track_sample_history=track), timer])
    trainer.fit(model, datamodule=dm)
    return timer.times[SKIP:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/sample_history_cost.json")
    args = ap.parse_args()
    if args.epochs < 3:
        ap.error(f"--epochs must be >= 3: the first {SKIP} steps of each run are left out (about 11 steps an epoch)")
    torch.set_num_threads(1)
    import lightning_reweight.callbacks.meta_reweight as mr

    steps: dict[bool, list[float]] = {True: [], False: []}
    with quiet():
        mr.SampleWeightHistory = TimedHistory  # the callback builds the timed metric
        direct_steps = fit(True, args.epochs)
        mr.SampleWeightHistory = SampleWeightHistory
        for rep in range(args.repeats):
            for track in (True, False) if rep % 2 else (False, True):
                steps[track].extend(fit(track, args.epochs))
    update_ms = 1000 * statistics.median(TimedHistory.calls[SKIP:])
    step_ms = 1000 * statistics.median(direct_steps)
    on, off = (1000 * statistics.median(steps[k]) for k in (True, False))
    result = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=$PWD python benchmarks/sample_history_cost.py",
            "scenario": "digits-sym40",
            "method": "MetaReweight(L2RW(), hypergrad='finite_diff')",
            "epochs_per_run": args.epochs,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "direct": {"median_update_ms": update_ms, "median_step_ms": step_ms, "share_of_step": update_ms / step_ms},
        "whole_steps": {"median_step_ms_with": on, "median_step_ms_without": off, "ratio": on / off},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["direct"]), json.dumps(result["whole_steps"]))


if __name__ == "__main__":
    main()
