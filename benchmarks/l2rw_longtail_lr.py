"""L2RW on long-tailed digits: how the learning rate decides stability (a probe, not a benchmark row).

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/l2rw_longtail_lr.py --seeds 0 1 2 3 4 --lrs 0.05 0.02 \
        --methods l2rw ce --scenarios digits-lt10 digits-lt50

Trains ``MetaReweight(L2RW(), hypergrad="finite_diff")`` (``l2rw``) or plain cross-entropy (``ce``, the same
model without the callback) with the shared recipe except the learning rate, and records every 10 epochs the
balanced test accuracy, the median effective sample size of the weights ``(sum w)^2 / sum w^2`` (of a 100-sample
batch; L2RW only) and the weighted training loss. Writes ``benchmarks/results/l2rw_longtail_lr.json`` with a
summary: last-epoch balanced accuracy per (scenario, method, lr), mean and range over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
from lightning_reweight.metrics import BalancedAccuracy  # noqa: E402
from lightning_reweight.models import MLP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Probe(L.Callback):
    """Every 10 epochs: balanced test accuracy, median effective sample size, weighted train loss."""

    def __init__(self, dm) -> None:
        self.dm = dm
        self.ess: list[float] = []
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = pl_module.last_sample_weights
        if w is not None and float(w.sum()) > 0:
            self.ess.append(float(w.sum() ** 2 / (w**2).sum()))

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % 10:
            return
        metric = BalancedAccuracy(pl_module.num_classes)
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            for x, y, *_ in self.dm.test_dataloader():
                metric.update(pl_module(x).argmax(1), y)
        pl_module.train(was_training)
        self.rows.append({
            "epoch": trainer.current_epoch + 1,
            "balanced_test_acc": 100 * float(metric.compute()),
            "median_effective_sample_size": statistics.median(self.ess) if self.ess else 0.0,
            "weighted_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        })
        self.ess.clear()


def run(scenario: str, method: str, seed: int, lr: float) -> list[dict[str, float]]:
    sc = SCENARIOS[scenario]
    recipe = sc.recipe
    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(sc, seed)
    model = ReweightClassifier(MLP(64, dm.num_classes, hidden=recipe.hidden), dm.num_classes, lr=lr,
                               momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    probe = Probe(dm)
    callbacks = [MetaReweight(L2RW(), hypergrad="finite_diff", meta_seed=seed), probe] if method == "l2rw" else [probe]
    make_trainer(recipe.epochs, callbacks).fit(model, datamodule=dm)
    return probe.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.02])
    parser.add_argument("--methods", nargs="+", choices=["l2rw", "ce"], default=["l2rw"])
    parser.add_argument("--scenarios", nargs="+", choices=["digits-lt10", "digits-lt50"], default=["digits-lt50"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/l2rw_longtail_lr.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    with quiet():
        for scenario in args.scenarios:
            for method in args.methods:
                for lr in args.lrs:
                    for seed in args.seeds:
                        rows = run(scenario, method, seed, lr)
                        runs.append({"scenario": scenario, "method": method, "seed": seed, "lr": lr, "curve": rows})
                        print(f"{scenario} {method} lr {lr} seed {seed}: " + ", ".join(
                            f"ep{r['epoch']} {r['balanced_test_acc']:.1f}% ess {r['median_effective_sample_size']:.1f}"
                            for r in rows), flush=True)
    summary = []
    for key in dict.fromkeys((r["scenario"], r["method"], r["lr"]) for r in runs):
        last = [r["curve"][-1]["balanced_test_acc"] for r in runs if (r["scenario"], r["method"], r["lr"]) == key]
        summary.append({"scenario": key[0], "method": key[1], "lr": key[2], "seeds": len(last),
                        "last_balanced_acc_mean": statistics.fmean(last), "min": min(last), "max": max(last)})
    result = {
        "meta": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": "PYTHONPATH=$PWD python benchmarks/l2rw_longtail_lr.py "
                            f"--seeds {' '.join(map(str, args.seeds))} --lrs {' '.join(map(str, args.lrs))} "
                            f"--methods {' '.join(args.methods)} --scenarios {' '.join(args.scenarios)}",
                 "torch": torch.__version__},
        "summary": summary,
        "runs": runs,
    }
    for row in summary:
        print(f"{row['scenario']} {row['method']} lr {row['lr']}: {row['last_balanced_acc_mean']:.2f} "
              f"({row['min']:.1f}-{row['max']:.1f}, n={row['seeds']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
