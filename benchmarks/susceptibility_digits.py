"""Susceptibility on digits: does zeta track memorisation of noisy labels, and what does the monitor cost?

Run from the repository root:

    python benchmarks/susceptibility_digits.py

Writes ``benchmarks/results/susceptibility_digits.json`` and ``docs/_static/susceptibility_digits.png``.

1. Cross-entropy on digits with 60% symmetric noise and on clean digits (the shared ``digits-sym60`` /
   ``digits-clean`` recipe, 60 epochs), with :class:`SusceptibilityMonitor` at its defaults. Per epoch: zeta, the
   drop, and train accuracy on the noisy and the clean subsets. Reported: Spearman correlation between zeta and
   noisy-subset train accuracy over the epochs; whether zeta on clean digits stays below zeta under 60% noise at
   every epoch. The same pair again with BatchNorm after each hidden layer (a second model, reported beside it).
2. Overhead: epoch wall time with and without the monitor, in one process, interleaved and repeated; the monitor
   with its defaults (the noisy/clean accuracy is on because the digits datamodule knows the noise mask; by default
   it is counted from the training forwards, ``subset_accuracy="train_forward"``), its core probe alone
   (``subset_accuracy="off"``) and, in route (a)/(b) only, the separate eval pass (``subset_accuracy="eval_pass"``).
   Three routes (plus, for the default, the time of its per-step and epoch-end bookkeeping alone: every hook but the
   probe at the epoch's first batch, minus the same for the core probe): (a) whole runs with / without the monitor,
   interleaved and repeated (median epoch times); (b) the monitor's own hook time per epoch over the median plain
   epoch; (c) paired epochs within one run (``every_n_epochs=2``: measured and unmeasured epochs alternate). The
   machine is shared, so (b) and (c) are the less noisy figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightning_reweight.bench.runner import make_datamodule, make_trainer, quiet  # noqa: E402
from lightning_reweight.bench.scenarios import SCENARIOS  # noqa: E402
from lightning_reweight.callbacks import SusceptibilityMonitor  # noqa: E402
from lightning_reweight.classifier import ReweightClassifier  # noqa: E402
from lightning_reweight.models import MLP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class EpochTimer(L.Callback):
    """Wall time from one epoch start to the next (everything in the epoch, the monitor's hooks included).

    Put first in the callback list so that its start hook runs before the monitor's.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()

    @property
    def epoch_times(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def train(
    scenario: str, seed: int, epochs: int | None, callbacks: list, batch_norm: bool = False
) -> ReweightClassifier:
    sc = SCENARIOS[scenario]
    recipe = sc.recipe if epochs is None else replace(sc.recipe, epochs=epochs)
    L.seed_everything(seed, verbose=False)
    dm = make_datamodule(sc, seed)
    model = ReweightClassifier(
        MLP(64, dm.num_classes, hidden=recipe.hidden, batch_norm=batch_norm),
        dm.num_classes,
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    trainer = make_trainer(recipe.epochs, callbacks)
    trainer.fit(model, datamodule=dm)
    return model


def curves(scenario: str, seed: int, epochs: int | None, batch_norm: bool = False) -> list[dict[str, float]]:
    monitor = SusceptibilityMonitor()
    train(scenario, seed, epochs, [monitor], batch_norm)
    return monitor.logged_history


def below_fraction(clean: list[dict], noisy: list[dict]) -> float:
    """Fraction of epochs at which zeta under clean labels is below zeta under 60% noise."""
    pairs = [(c["memorization/zeta"], n["memorization/zeta"]) for c, n in zip(clean, noisy)]
    return sum(c < n for c, n in pairs) / len(pairs)


class TimedMonitor(SusceptibilityMonitor):
    """The monitor with its own hook time recorded per epoch (a second, less noisy route to its cost)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_times: dict[int, float] = {}
        self.bookkeeping_times: dict[int, float] = {}  # every hook but the probe / eval pass (`_measure`)
        self._nested = 0.0  # `_measure`'s time inside the hook being timed (counted apart, not as bookkeeping)

    def _add(self, epoch, seconds, bookkeeping=True):
        self.hook_times[epoch] = self.hook_times.get(epoch, 0.0) + seconds
        if bookkeeping:
            self.bookkeeping_times[epoch] = self.bookkeeping_times.get(epoch, 0.0) + seconds

    def _timed(self, hook, trainer, *args):
        self._nested = 0.0
        start = time.perf_counter()
        hook(trainer, *args)
        self._add(trainer.current_epoch, time.perf_counter() - start - self._nested)

    def _measure(self, trainer, pl_module):  # the probe (at the epoch's first batch) and the eval pass
        start = time.perf_counter()
        super()._measure(trainer, pl_module)
        seconds = time.perf_counter() - start
        self._nested += seconds
        self._add(trainer.current_epoch, seconds, bookkeeping=False)

    def on_train_epoch_start(self, trainer, pl_module):
        self._timed(super().on_train_epoch_start, trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._timed(super().on_train_batch_start, trainer, pl_module, batch, batch_idx)

    def _capture_train_logits(self, module, args, output):  # the forward hook, inside the training forward
        start = time.perf_counter()
        super()._capture_train_logits(module, args, output)
        self._add(module.trainer.current_epoch, time.perf_counter() - start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._timed(super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self._timed(super().on_train_epoch_end, trainer, pl_module)


def timing(seed: int, epochs: int, repeats: int) -> dict:
    variants = {
        "plain": dict,
        "monitor_default": dict,
        "monitor_core": lambda: {"subset_accuracy": "off"},
        "monitor_eval_pass": lambda: {"subset_accuracy": "eval_pass"},
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    hooks: dict[str, list[float]] = {k: [] for k in variants if k != "plain"}
    books: dict[str, list[float]] = {k: [] for k in variants if k != "plain"}
    for _ in range(repeats):
        for name, kwargs in variants.items():
            timer = EpochTimer()
            monitor = None if name == "plain" else TimedMonitor(**kwargs())
            train("digits-sym60", seed, epochs, [timer] + ([monitor] if monitor else []))
            times[name].extend(timer.epoch_times[1:])  # skip the warm-up epoch (it builds the in-memory pool)
            if monitor is not None:
                hooks[name].extend(t for e, t in sorted(monitor.hook_times.items()) if e >= 1)
                books[name].extend(t for e, t in sorted(monitor.bookkeeping_times.items()) if e >= 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    hook_med = {k: statistics.median(v) for k, v in hooks.items()}
    book_med = {k: statistics.median(v) for k, v in books.items()}
    return {
        "epochs_per_run": epochs,
        "repeats": repeats,
        "median_epoch_ms": {k: 1000 * v for k, v in med.items()},
        "median_monitor_hook_ms_per_epoch": {k: 1000 * v for k, v in hook_med.items()},
        "median_monitor_hook_ms_per_epoch_without_epoch_start": {k: 1000 * v for k, v in book_med.items()},
        "train_forward_bookkeeping_share_of_plain_epoch": (book_med["monitor_default"] - book_med["monitor_core"])
        / med["plain"],
        "epoch_time_ratio_default": med["monitor_default"] / med["plain"],
        "epoch_time_ratio_core": med["monitor_core"] / med["plain"],
        "epoch_time_ratio_eval_pass": med["monitor_eval_pass"] / med["plain"],
        "hook_share_of_plain_epoch_default": hook_med["monitor_default"] / med["plain"],
        "hook_share_of_plain_epoch_core": hook_med["monitor_core"] / med["plain"],
        "hook_share_of_plain_epoch_eval_pass": hook_med["monitor_eval_pass"] / med["plain"],
        "epochs_timed": {k: len(v) for k, v in times.items()},
    }


def timing_paired(seed: int, epochs: int, repeats: int) -> dict:
    """Epoch-level pairing: a monitor with ``every_n_epochs=2`` measures on even epochs only, so measured and
    unmeasured epochs alternate within one run and share the machine's load. Ratio = median measured epoch /
    median unmeasured epoch (epochs 0 and 1 skipped: they build the in-memory pool and caches)."""
    out = {}
    for name, kwargs in {"default": {}, "core": {"subset_accuracy": "off"}}.items():
        measured, skipped = [], []
        for _ in range(repeats):
            timer = EpochTimer()
            train("digits-sym60", seed, epochs, [timer, SusceptibilityMonitor(every_n_epochs=2, **kwargs)])
            for e, t in enumerate(timer.epoch_times):
                if e >= 2:
                    (measured if e % 2 == 0 else skipped).append(t)
        m, u = statistics.median(measured), statistics.median(skipped)
        out[name] = {"median_measured_epoch_ms": 1000 * m, "median_unmeasured_epoch_ms": 1000 * u, "ratio": m / u,
                     "epochs": len(measured) + len(skipped)}
    return out


def probe_breakdown(rounds: int = 7, n: int = 200) -> dict:
    """The probe's parts timed in a hot loop outside the Trainer (digits MLP, batch 128, SGD as in the recipe).

    Median over ``rounds`` of the mean of ``n`` calls, in ms. ``compute_floor`` = forward+backward + no-grad
    forward: the arithmetic the definition requires (2 forwards + 1 backward), whatever the implementation.
    """
    import copy

    from lightning_reweight.functional import susceptibility_step
    from lightning_reweight.functional._sgd import sgd_update_
    from lightning_reweight.functional.susceptibility import _restored_values, preserved_rng

    recipe = SCENARIOS["digits-sym60"].recipe
    torch.manual_seed(0)
    net = MLP(64, 10, hidden=recipe.hidden)
    opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    x, y = torch.randn(128, 1, 8, 8), torch.randint(10, (128,))
    xt, yt = torch.randn(recipe.batch_size, 1, 8, 8), torch.randint(10, (recipe.batch_size,))
    ce = torch.nn.functional.cross_entropy
    params = list(net.parameters())

    def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        ce(net(xt), yt).backward()
        opt.step()

    for _ in range(3):
        train_step(net, opt)  # momentum buffers, as mid-training
    # the parts that move parameters (a training step, the SGD update) run on a copy; the probe's parts on `net`
    scratch_net, scratch_opt = copy.deepcopy((net, opt))
    grads = {p: torch.randn_like(p) for p in scratch_net.parameters()}

    def fwd_bwd() -> None:
        torch.autograd.grad(ce(net(x), y), params)

    def fwd_no_grad() -> None:
        with torch.no_grad():
            ce(net(x), y)

    def rng() -> None:
        with preserved_rng():
            pass

    def save_restore() -> None:
        with _restored_values(params):
            pass

    parts = {
        "train_step_batch100_raw_torch": lambda: train_step(scratch_net, scratch_opt),
        "forward_backward_batch128": fwd_bwd,
        "forward_no_grad_batch128": fwd_no_grad,
        "sgd_update": lambda: sgd_update_(scratch_opt, grads),
        "rng_save_restore": rng,
        "parameter_save_restore": save_restore,
        "susceptibility_step": lambda: susceptibility_step(net, opt, x, y),
    }
    out = {}
    for name, fn in parts.items():
        times = []
        for _ in range(rounds):
            for _ in range(10):
                fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - start) / n * 1000)
        out[name] = statistics.median(times)
    out["compute_floor"] = out["forward_backward_batch128"] + out["forward_no_grad_batch128"]
    return out


def plot(noisy: list[dict], clean: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [r["epoch"] for r in noisy]
    ax.plot(ep, [r["memorization/zeta"] for r in noisy], color="tab:red", label="zeta")
    ax.set_xlabel("epoch")
    ax.set_ylabel("susceptibility zeta")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["memorization/train_acc_noisy"] for r in noisy], color="tab:blue", label="train acc, noisy subset")
    ax2.plot(ep, [r["memorization/train_acc_clean"] for r in noisy], color="tab:green", label="train acc, clean subset")
    ax2.set_ylabel("train accuracy on the given labels\n(training forwards, during the epoch)")
    ax2.set_ylim(0, 1)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center left")
    ax.set_title("CE, digits with 60% symmetric noise")
    ax_r.plot(ep, [r["memorization/zeta"] for r in noisy], color="tab:red", label="60% noise")
    ax_r.plot([r["epoch"] for r in clean], [r["memorization/zeta"] for r in clean], color="tab:red", linestyle="--",
              label="clean labels")
    ax_r.set_yscale("symlog", linthresh=1e-2)
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("susceptibility zeta (symlog)")
    ax_r.set_title("zeta: noisy vs clean training labels")
    ax_r.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def replot(json_path: Path, png: Path) -> None:
    """Redraw the figure from a results file (no training)."""
    curves = json.loads(json_path.read_text())["curves"]
    plot(curves["digits-sym60"], curves["digits-clean"], png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's 60 epochs")
    parser.add_argument("--timing-epochs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--paired-epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/susceptibility_digits.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs/_static/susceptibility_digits.png")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.timing_epochs < 2 or args.paired_epochs < 4:
        parser.error("--timing-epochs must be >= 2 (the first epoch is left out) and --paired-epochs >= 4 (epochs 0-1 "
                     "are left out, then measured and unmeasured epochs alternate)")
    if args.replot:
        replot(args.out, args.png)
        return
    torch.set_num_threads(1)
    from scipy.stats import spearmanr

    with quiet():
        noisy = curves("digits-sym60", args.seed, args.epochs)
        clean = curves("digits-clean", args.seed, args.epochs)
        noisy_bn = curves("digits-sym60", args.seed, args.epochs, batch_norm=True)
        clean_bn = curves("digits-clean", args.seed, args.epochs, batch_norm=True)
        cost = timing(args.seed, args.timing_epochs, args.repeats)
        cost["paired"] = timing_paired(args.seed, args.paired_epochs, 2)
        cost["probe_breakdown_hot_ms"] = probe_breakdown()
    plain_ms = cost["median_epoch_ms"]["plain"]
    breakdown = cost["probe_breakdown_hot_ms"]
    zeta_n = [r["memorization/zeta"] for r in noisy]
    zeta_c = [r["memorization/zeta"] for r in clean]
    acc_noisy = [r["memorization/train_acc_noisy"] for r in noisy]
    rho = spearmanr(zeta_n, acc_noisy).statistic
    rho_drop = spearmanr([r["memorization/drop"] for r in noisy], acc_noisy).statistic
    below = [c < n for c, n in zip(zeta_c, zeta_n)]
    result = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/susceptibility_digits.py",
            "args": {k: (str(v.relative_to(ROOT)) if isinstance(v, Path) and v.is_relative_to(ROOT) else str(v))
                     for k, v in vars(args).items()},
            "torch": torch.__version__,
            "lightning": L.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(),
            "monitor_defaults": {"batch_size": 128, "every_n_epochs": 1, "pool_size": 2048,
                                 "subset_accuracy": "train_forward"},
        },
        "acceptance": {
            "spearman_zeta_vs_noisy_train_acc": rho,
            "spearman_drop_vs_noisy_train_acc": rho_drop,
            "spearman_ok": bool(rho >= 0.8),
            "clean_zeta_below_noisy_every_epoch": all(below),
            "clean_zeta_below_noisy_fraction": sum(below) / len(below),
            "batchnorm_mlp_clean_zeta_below_noisy_fraction": below_fraction(clean_bn, noisy_bn),
            "batchnorm_mlp_spearman_zeta_vs_noisy_train_acc": spearmanr(
                [r["memorization/zeta"] for r in noisy_bn], [r["memorization/train_acc_noisy"] for r in noisy_bn]
            ).statistic,
            "paired_epoch_ratio_default": cost["paired"]["default"]["ratio"],
            "paired_epoch_ratio_core": cost["paired"]["core"]["ratio"],
            "epoch_time_ratio_default": cost["epoch_time_ratio_default"],
            "epoch_time_ratio_core": cost["epoch_time_ratio_core"],
            "monitor_hook_share_of_epoch_default": cost["hook_share_of_plain_epoch_default"],
            "monitor_hook_share_of_epoch_core": cost["hook_share_of_plain_epoch_core"],
            "monitor_hook_share_of_epoch_eval_pass": cost["hook_share_of_plain_epoch_eval_pass"],
            "train_forward_bookkeeping_share_of_epoch": cost["train_forward_bookkeeping_share_of_plain_epoch"],
            "probe_compute_floor_share_of_epoch": breakdown["compute_floor"] / plain_ms,
            "probe_hot_share_of_epoch": breakdown["susceptibility_step"] / plain_ms,
            "overhead_ok_default": bool(cost["paired"]["default"]["ratio"] <= 1.05),
            "overhead_ok_core": bool(cost["paired"]["core"]["ratio"] <= 1.05),
        },
        "timing": cost,
        "curves": {"digits-sym60": noisy, "digits-clean": clean},
        "curves_batchnorm_mlp": {"digits-sym60": noisy_bn, "digits-clean": clean_bn},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(noisy, clean, args.png)
    print(json.dumps(result["acceptance"], indent=2))
    print(json.dumps({k: v for k, v in cost.items() if "ms" in k or k == "paired"}, indent=2))


if __name__ == "__main__":
    main()
