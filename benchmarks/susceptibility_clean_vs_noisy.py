"""Is zeta under clean labels below zeta under 60% noise on digits? A sweep over models and recipes.

Run from the repository root:

    python benchmarks/susceptibility_clean_vs_noisy.py [--jobs 2]

Writes ``benchmarks/results/susceptibility_clean_vs_noisy.json``.

For every configuration (model x learning rate x schedule x weight decay; SGD with momentum 0.9, batch 100,
60 epochs, seed 0) a CE run on clean digits and one on digits with 60% symmetric noise, each with
:class:`SusceptibilityMonitor` at its defaults. Per epoch: zeta, the drop, noisy-subset train accuracy, and (a
diagnostic the monitor does not log) the probe batch's random-label loss *before* the step and the mean
max-softmax confidence of the network on it. Reported per configuration: the fraction of epochs 1..59 at which
clean zeta < noisy zeta (epoch 0 is excluded: both runs start from the same weights, so the two zetas are equal),
the Spearman correlation between zeta and noisy-subset train accuracy (60% noise run), and the mean
random-label loss before the step and confidence of each run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mlp", "mlp-bn", "cnn-bn")
LRS = (0.05, 0.1)
SCHEDULES = ("none", "cosine")
WEIGHT_DECAYS = (5e-4, 0.0)


def _backbone(name: str, num_classes: int):
    from torch import nn

    from lightning_reweight.models import MLP

    if name == "mlp":
        return MLP(64, num_classes, hidden=(256, 256))
    if name == "mlp-bn":
        return MLP(64, num_classes, hidden=(256, 256), batch_norm=True)

    class SmallCNN(nn.Module):
        """Two 3x3 conv + BatchNorm layers on the 1x8x8 digit images, max-pool, two linear layers."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
            )

        def forward(self, x):
            return self.body(x)

    return SmallCNN()


def _run(scenario: str, model: str, lr: float, schedule: str, weight_decay: float, epochs: int) -> list[dict]:
    import lightning as L
    import torch

    from lightning_reweight.bench.runner import make_datamodule, make_trainer, quiet
    from lightning_reweight.bench.scenarios import SCENARIOS
    from lightning_reweight.callbacks import SusceptibilityMonitor
    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.functional.susceptibility import preserved_training_state

    torch.set_num_threads(1)
    monitor = SusceptibilityMonitor()
    before: dict[int, tuple[float, float]] = {}

    class ProbeLoss(L.Callback):
        """The probe batch's random-label loss and confidence before the step (runs after the monitor)."""

        def on_train_epoch_start(self, trainer, pl_module):
            x, y = monitor.probe_batch(trainer, trainer.current_epoch)
            with preserved_training_state(pl_module), torch.no_grad():
                logits = pl_module(x).float()
            loss = torch.nn.functional.cross_entropy(logits, y)
            before[trainer.current_epoch] = (float(loss), float(logits.softmax(1).max(1).values.mean()))

    sc = SCENARIOS[scenario]
    L.seed_everything(0, verbose=False)
    dm = make_datamodule(sc, 0)
    module = ReweightClassifier(
        _backbone(model, dm.num_classes), dm.num_classes, lr=lr, momentum=0.9, weight_decay=weight_decay,
        scheduler=schedule,
    )
    with quiet():
        make_trainer(epochs, [monitor, ProbeLoss()]).fit(module, datamodule=dm)
    rows = monitor.logged_history
    for r in rows:
        r["loss_before"], r["confidence"] = before[r["epoch"]]
    return rows


def _config(args: tuple) -> dict:
    from scipy.stats import spearmanr

    model, lr, schedule, wd, epochs = args
    noisy = _run("digits-sym60", model, lr, schedule, wd, epochs)
    clean = _run("digits-clean", model, lr, schedule, wd, epochs)
    zn = [r["memorization/zeta"] for r in noisy]
    zc = [r["memorization/zeta"] for r in clean]
    below = [c < n for c, n in zip(zc[1:], zn[1:])]

    def mean(rows, key):
        return sum(r[key] for r in rows[1:]) / len(rows[1:])

    return {
        "model": model, "lr": lr, "schedule": schedule, "weight_decay": wd,
        "clean_zeta_below_noisy_fraction": sum(below) / len(below),
        "spearman_zeta_vs_noisy_train_acc": float(
            spearmanr(zn, [r["memorization/train_acc_noisy"] for r in noisy]).statistic
        ),
        "final_zeta": {"clean": zc[-1], "noisy": zn[-1]},
        "final_noisy_subset_train_acc": noisy[-1]["memorization/train_acc_noisy"],
        "mean_random_label_loss_before": {"clean": mean(clean, "loss_before"), "noisy": mean(noisy, "loss_before")},
        "mean_confidence_on_probe": {"clean": mean(clean, "confidence"), "noisy": mean(noisy, "confidence")},
        "mean_drop": {"clean": mean(clean, "memorization/drop"), "noisy": mean(noisy, "memorization/drop")},
        "curves": {"digits-clean": clean, "digits-sym60": noisy},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/susceptibility_clean_vs_noisy.json")
    args = parser.parse_args()
    from tqdm import tqdm

    configs = [(*c, args.epochs) for c in itertools.product(MODELS, LRS, SCHEDULES, WEIGHT_DECAYS)]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_config, configs), total=len(configs), desc="configurations"))
    import lightning as L
    import torch

    summary = [
        {k: v for k, v in r.items() if k != "curves"} for r in results
    ]
    out = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/susceptibility_clean_vs_noisy.py",
            "epochs": args.epochs,
            "recipe": "SGD momentum 0.9, batch 100, seed 0; monitor defaults (batch 128, every epoch)",
            "torch": torch.__version__,
            "lightning": L.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        },
        "configurations_where_clean_is_below_at_every_epoch": sum(
            r["clean_zeta_below_noisy_fraction"] == 1.0 for r in results
        ),
        "configurations": len(results),
        "summary": summary,
        "curves": {f"{r['model']} lr={r['lr']} {r['schedule']} wd={r['weight_decay']}": r["curves"] for r in results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for r in summary:
        print(
            f"{r['model']:7s} lr={r['lr']:<5} {r['schedule']:6s} wd={r['weight_decay']:<7} "
            f"below={r['clean_zeta_below_noisy_fraction']:.2f} rho={r['spearman_zeta_vs_noisy_train_acc']:.3f} "
            f"loss_before clean/noisy={r['mean_random_label_loss_before']['clean']:.2f}/"
            f"{r['mean_random_label_loss_before']['noisy']:.2f} "
            f"conf={r['mean_confidence_on_probe']['clean']:.2f}/{r['mean_confidence_on_probe']['noisy']:.2f}"
        )


if __name__ == "__main__":
    main()
