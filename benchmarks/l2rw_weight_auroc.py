"""Why L2RW's weight AUROC stays near 0.82 on digits-sym40: where the ranking errors come from.

Run from the repository root:

    PYTHONPATH=$PWD python benchmarks/l2rw_weight_auroc.py

Trains ``MetaReweight(L2RW(), hypergrad="finite_diff")`` on ``digits-sym40`` (5 seeds) in three settings: the
shared recipe (lr 0.05, a meta set of 10 clean images per class used as one meta batch of 100), the same at lr 0.02
(the learning rate of the issue's outside trial), and a meta set three times larger (30 per class, one meta batch
of 300; the training set is 200 images smaller). For every training batch it records, beside the weights the
callback uses, the raw alignments ``u_i = <grad l_i, grad L_meta>`` before clipping, and sorts the samples into
groups by the model's prediction at that step (clean; noisy predicted as its true class; noisy predicted as its
given, wrong label; noisy predicted as a third class). Reported per setting (mean over seeds of per-epoch values,
all 60 epochs, no warm-up):

- the weight AUROC against the noise mask (the benchmark's figure; tied zero weights count one half);
- the AUROC of the raw alignments (no clipping, no ties): how much of the gap the clipping's ties explain;
- the AUROC of the sign alone (weight > 0 or not) and the AUROC among the positively weighted samples only (below
  0.5 when the noisy samples that get a weight get larger ones than the clean samples that do);
- the share of clean samples with zero weight and of noisy samples with positive weight, per group.

Writes ``benchmarks/results/l2rw_weight_auroc.json`` and ``docs/_static/l2rw_weight_auroc.png`` (about 2.5
minutes on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_reweight.bench.runner import make_datamodule, make_trainer, quiet  # noqa: E402
from lightning_reweight.bench.scenarios import SCENARIOS  # noqa: E402
from lightning_reweight.callbacks import MetaReweight  # noqa: E402
from lightning_reweight.classifier import ReweightClassifier  # noqa: E402
from lightning_reweight.contract import mean_scale  # noqa: E402
from lightning_reweight.meta import L2RW  # noqa: E402
from lightning_reweight.meta.engine import MetaProblem  # noqa: E402
from lightning_reweight.meta.l2rw import l2rw_from_alignment  # noqa: E402
from lightning_reweight.metrics import rank_auroc  # noqa: E402
from lightning_reweight.models import MLP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "shared recipe (lr 0.05, meta 10/class)": {"lr": 0.05, "meta_per_class": 10, "meta_batch_size": 100},
    "lr 0.02": {"lr": 0.02, "meta_per_class": 10, "meta_batch_size": 100},
    "meta 30/class (one meta batch of 300)": {"lr": 0.05, "meta_per_class": 30, "meta_batch_size": 300},
}
GROUPS = ("clean", "noisy: predicted true class", "noisy: predicted given label", "noisy: predicted other class")


class RecordingL2RW(L2RW):
    """L2RW that also keeps the raw alignments and the model's predictions of the batch it weighted."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[Tensor, Tensor] | None = None

    def meta_weights(self, problem: MetaProblem, lr: float) -> Tensor:
        alignment = problem.alignment().detach().float()
        with torch.no_grad():  # the MLP has no dropout or BatchNorm: this forward changes nothing
            preds = problem.module(problem.train_batch[0]).argmax(dim=1)
        self.last = (alignment, preds)
        return mean_scale(l2rw_from_alignment(alignment))


class Recorder(L.Callback):
    """Per epoch: AUROC of the weights and of the raw alignments; per group, the share of positive weights."""

    def __init__(self, strategy: RecordingL2RW, dm) -> None:
        self.strategy, self.noisy, self.clean_targets = strategy, dm.noise_mask.bool(), dm.clean_train_targets
        self.curves: dict[str, list[float]] = defaultdict(list)  # one value per epoch for each key
        self._reset()

    def _reset(self) -> None:
        self.weights: list[Tensor] = []
        self.alignments: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # [samples, with positive weight]
        self.fit: list[int] = [0, 0, 0, 0]  # clean: predicted given label, samples; noisy: the same

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.strategy.last is None:
            return
        alignment, preds = self.strategy.last
        self.strategy.last = None
        _, given, idx = batch
        weights = pl_module.last_sample_weights.detach().float()
        noisy = self.noisy[idx]
        self.weights.append(weights)
        self.alignments.append(alignment)
        self.masks.append(noisy)
        true = self.clean_targets[idx]
        hit = preds == given
        self.fit[0] += int((hit & ~noisy).sum())
        self.fit[1] += int((~noisy).sum())
        self.fit[2] += int((hit & noisy).sum())
        self.fit[3] += int(noisy.sum())
        for g, positive in (
            ("clean", ~noisy),
            ("noisy: predicted true class", noisy & (preds == true)),
            ("noisy: predicted given label", noisy & (preds == given)),
            ("noisy: predicted other class", noisy & (preds != true) & (preds != given)),
        ):
            self.groups[g][0] += int(positive.sum())
            self.groups[g][1] += int((positive & (weights > 0)).sum())

    def on_train_epoch_end(self, trainer, pl_module):
        clean = ~torch.cat(self.masks)
        weights, alignments = torch.cat(self.weights), torch.cat(self.alignments)
        total = sum(n for n, _ in self.groups.values())
        positive = weights > 0
        row = {
            "weight_auroc": float(rank_auroc(weights, clean)),
            "alignment_auroc": float(rank_auroc(alignments, clean)),
            # the sign alone (weight > 0 or not), and the ranking among the positively weighted samples only
            "sign_auroc": float(rank_auroc(positive.float(), clean)),
            "auroc_among_positive_weights": float(rank_auroc(weights[positive], clean[positive])),
            "alignment_auroc_among_positive_weights": float(rank_auroc(alignments[positive], clean[positive])),
            "train_acc_clean": self.fit[0] / max(self.fit[1], 1),
            "train_acc_noisy": self.fit[2] / max(self.fit[3], 1),
        }
        for g in GROUPS:
            n, pos = self.groups.get(g, (0, 0))
            row[f"share of samples | {g}"] = n / total
            row[f"positive weight | {g}"] = pos / n if n else float("nan")
        for key, value in row.items():
            self.curves[key].append(value)
        self._reset()


def run(seed: int, setting: dict[str, float], epochs: int) -> dict:
    sc = SCENARIOS["digits-sym40"]
    recipe = replace(sc.recipe, epochs=epochs, **setting)
    sc = replace(sc, recipe=recipe)
    with quiet():
        L.seed_everything(seed, verbose=False)
        dm = make_datamodule(sc, seed)
        dm.setup("fit")
        strategy = RecordingL2RW()
        recorder = Recorder(strategy, dm)
        model = ReweightClassifier(
            MLP(64, dm.num_classes, hidden=recipe.hidden),
            dm.num_classes,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        callback = MetaReweight(strategy, hypergrad="finite_diff", meta_seed=seed)
        trainer = make_trainer(recipe.epochs, [callback, recorder])
        trainer.fit(model, datamodule=dm)
        (test,) = trainer.test(model, datamodule=dm, verbose=False)
    # the callback's own per-epoch AUROC is an independent route to the same weight AUROC
    assert all(abs(a - b) < 1e-9 for a, b in zip(callback.auroc_history, recorder.curves["weight_auroc"]))
    return {"seed": seed, "test_acc": 100.0 * float(test["test/acc"]), "per_epoch": dict(recorder.curves)}


def summarise(runs: list[dict]) -> dict[str, float]:
    keys = list(runs[0]["per_epoch"])
    per_seed = {k: [statistics.fmean(v for v in run["per_epoch"][k] if v == v) for run in runs] for k in keys}
    out = {f"mean over epochs and seeds | {k}": statistics.fmean(v) for k, v in per_seed.items()}
    out["test_acc"] = statistics.fmean(r["test_acc"] for r in runs)
    out["max over epochs and seeds | weight_auroc"] = max(max(run["per_epoch"]["weight_auroc"]) for run in runs)
    return out


def _rounded(value: object) -> object:
    """Floats to 5 significant digits, recursively (keeps the per-epoch records small)."""
    if isinstance(value, float):
        return float(f"{value:.5g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """Per-epoch means over seeds: the weight AUROC of every setting; for the shared recipe, what happens to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(rs: list[dict], key: str) -> list[float]:
        return [statistics.fmean(values) for values in zip(*(r["per_epoch"][key] for r in rs))]

    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in runs.items():
        ax.plot(curve(rs, "weight_auroc"), label=name)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("weight AUROC against the noise mask")
    ax.set_title("L2RW, digits-sym40: weight AUROC per epoch")
    ax.legend(fontsize=8)
    shared = next(iter(runs.values()))
    for key, label, style in (
        ("weight_auroc", "weight AUROC", "-"),
        ("alignment_auroc", "AUROC of the raw alignments", "--"),
        ("train_acc_clean", "train acc, clean subset", "-"),
        ("positive weight | clean", "clean samples with weight > 0", ":"),
        ("positive weight | noisy: predicted true class", "noisy (predicted true class) with weight > 0", ":"),
    ):
        ax_r.plot(curve(shared, key), linestyle=style, label=label)
    ax_r.set_ylim(0, 1)
    ax_r.set_xlabel("epoch")
    ax_r.set_title(next(iter(runs)))
    ax_r.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "l2rw_weight_auroc.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "_static" / "l2rw_weight_auroc.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from --output")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.output.read_text())["runs"], args.figure)
        return
    from tqdm.auto import tqdm

    jobs = [(name, seed) for name in SETTINGS for seed in args.seeds]
    runs: dict[str, list[dict]] = defaultdict(list)
    for name, seed in tqdm(jobs, desc="l2rw runs", unit="run"):
        runs[name].append(run(seed, SETTINGS[name], args.epochs))
    summary = {name: summarise(rs) for name, rs in runs.items()}
    for name, s in summary.items():
        print(
            f"{name}: acc {s['test_acc']:.1f}, weight AUROC {s['mean over epochs and seeds | weight_auroc']:.3f}, "
            f"alignment AUROC {s['mean over epochs and seeds | alignment_auroc']:.3f}, sign AUROC "
            f"{s['mean over epochs and seeds | sign_auroc']:.3f}, AUROC among positive weights "
            f"{s['mean over epochs and seeds | auroc_among_positive_weights']:.3f}"
        )
        for g in GROUPS:
            print(
                f"    {g}: share {s[f'mean over epochs and seeds | share of samples | {g}']:.3f}, positive weight "
                f"{s[f'mean over epochs and seeds | positive weight | {g}']:.3f}"
            )
    result = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=$PWD python benchmarks/l2rw_weight_auroc.py",
            "scenario": "digits-sym40",
            "method": "MetaReweight(L2RW(), hypergrad='finite_diff'), no warm-up",
            "settings": SETTINGS,
            "seeds": args.seeds,
            "epochs": args.epochs,
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
        "summary": summary,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(_rounded(result)) + "\n")
    plot(runs, args.figure)
    print(f"wrote {args.output} and {args.figure}")


if __name__ == "__main__":
    main()
