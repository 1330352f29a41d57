"""Meta-Weight-Net with sum-normalised weights: which meta optimizer keeps the weighting function in place.

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/mwn_meta_optimizer.py [--jobs 2]

Trains ``MetaReweight(MetaWeightNet(normalize=True, ...), hypergrad="finite_diff", warmup_epochs=5)`` on
``digits-sym40`` and ``digits-sym60`` (seeds 0-2, shared recipe, 60 epochs) with Adam (lr 1e-3, weight decay 1e-4:
the official ResNet-32 script's optimizer) and with SGD (momentum 0.9, Nesterov, weight decay 5e-4: the official
WRN-28-10 script's, the one it pairs with normalised weights) at meta lr 1e-3, 1e-2, 1e-1 and 1. Per run: test
accuracy, the weight AUROC against the noise mask per epoch, and the learned weighting function at the end
(mean-scale weights of the losses 0.01, 0.1, 0.5, 1, 2, 3, 5). About 6 minutes with two worker processes.

Writes ``benchmarks/results/mwn_meta_optimizer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, object]] = {
    "adam 1e-3": {"meta_optimizer": "adam", "meta_lr": 1e-3, "meta_weight_decay": 1e-4},
    **{
        f"sgd {lr:g}": {
            "meta_optimizer": "sgd",
            "meta_lr": lr,
            "meta_weight_decay": 5e-4,
            "meta_momentum": 0.9,
            "nesterov": True,
        }
        for lr in (1e-3, 1e-2, 1e-1, 1.0)
    },
}
PROBE_LOSSES = (0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 5.0)


def run(config: str, scenario: str, seed: int, epochs: int) -> dict:
    import lightning as L
    import torch

    from lightning_reweight.bench.runner import make_datamodule, make_trainer, quiet
    from lightning_reweight.bench.scenarios import SCENARIOS
    from lightning_reweight.callbacks import MetaReweight
    from lightning_reweight.classifier import ReweightClassifier
    from lightning_reweight.meta import MetaWeightNet
    from lightning_reweight.models import MLP

    torch.set_num_threads(1)
    sc = SCENARIOS[scenario]
    r = sc.recipe
    with quiet():
        L.seed_everything(seed, verbose=False)
        dm = make_datamodule(sc, seed)
        strategy = MetaWeightNet(normalize=True, **CONFIGS[config])  # type: ignore[arg-type]
        callback = MetaReweight(strategy, hypergrad="finite_diff", meta_seed=seed, warmup_epochs=5)
        model = ReweightClassifier(
            MLP(64, dm.num_classes, hidden=r.hidden),
            dm.num_classes,
            lr=r.lr,
            momentum=r.momentum,
            weight_decay=r.weight_decay,
        )
        trainer = make_trainer(epochs, [callback])
        trainer.fit(model, datamodule=dm)
        (test,) = trainer.test(model, datamodule=dm, verbose=False)
    return {
        "config": config,
        "scenario": scenario,
        "seed": seed,
        "test_acc": 100.0 * float(test["test/acc"]),
        "weight_auroc_per_epoch": [round(a, 5) for a in callback.auroc_history],
        "weighting_function_at_end": [round(w, 5) for w in strategy.weights(torch.tensor(PROBE_LOSSES)).tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=["digits-sym40", "digits-sym60"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "mwn_meta_optimizer.json")
    args = parser.parse_args()
    if args.epochs <= 5:
        parser.error("--epochs must be > 5: the first 5 epochs are MW-Net's warm-up, without meta steps")
    from tqdm.auto import tqdm

    jobs = [(c, s, seed, args.epochs) for s in args.scenarios for c in args.configs for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        runs = [f.result() for f in tqdm(futures, desc="mwn runs", unit="run")]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for s in args.scenarios:
        for c in args.configs:
            rs = [r for r in runs if r["scenario"] == s and r["config"] == c]
            last = [r["weight_auroc_per_epoch"][-1] for r in rs]
            summary.setdefault(s, {})[c] = {
                "test_acc_mean": statistics.fmean(r["test_acc"] for r in rs),
                "weight_auroc_last_min": min(last),
                "weight_auroc_last_max": max(last),
                "weight_auroc_mean_over_epochs": statistics.fmean(
                    statistics.fmean(r["weight_auroc_per_epoch"]) for r in rs
                ),
            }
            row = summary[s][c]
            print(
                f"{s} {c:9s}: acc {row['test_acc_mean']:.1f}, last-epoch AUROC {row['weight_auroc_last_min']:.2f}"
                f"-{row['weight_auroc_last_max']:.2f}, mean over epochs {row['weight_auroc_mean_over_epochs']:.3f}"
            )
    import lightning as L
    import torch

    result = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=$PWD python benchmarks/mwn_meta_optimizer.py --jobs 2",
            "configs": CONFIGS,
            "probe_losses": PROBE_LOSSES,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
        "summary": summary,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
