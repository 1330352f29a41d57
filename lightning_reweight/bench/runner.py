"""Run methods on scenarios over seeds; collect accuracy, balanced accuracy and step time."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

import lightning as L
import torch

from lightning_reweight.bench.methods import METHODS, BuildContext
from lightning_reweight.bench.scenarios import SCENARIOS, Scenario
from lightning_reweight.bench.test_curve import TestCurve
from lightning_reweight.bench.timing import StepTimer
from lightning_reweight.classifier import ReweightClassifier
from lightning_reweight.models import MLP, NormalizedLinear

__all__ = ["applicable", "make_trainer", "run_benchmark", "run_one"]

BASELINE = "ce"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's informational logging and the data-loader warnings during benchmark runs."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*GPU available.*")
        # Lightning's own modules only: "lightning" alone would match lightning_reweight's warnings too (a prefix)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"lightning(\.|$)")
        warnings.filterwarnings("ignore", message=".*treespec.*")  # lightning 2.6 on torch >= 2.10
        try:
            yield
        finally:
            for lg, lvl in zip(loggers, levels):
                lg.setLevel(lvl)


def applicable(method: str, scenario: Scenario) -> bool:
    """Whether ``method`` is meant for ``scenario`` (shared tags)."""
    return bool(METHODS[method].tags & scenario.tags)


def make_datamodule(scenario: Scenario, seed: int) -> Any:
    """The digits datamodule of a scenario, set up."""
    from lightning_reweight.data import DigitsDataModule

    r = scenario.recipe
    dm = DigitsDataModule(
        noise_rate=scenario.noise_rate,
        noise_kind=scenario.noise_kind,
        imbalance_ratio=scenario.imbalance_ratio,
        imbalance_profile=scenario.imbalance_profile,
        meta_per_class=r.meta_per_class,
        batch_size=r.batch_size,
        meta_batch_size=r.meta_batch_size,
        seed=seed,
    )
    dm.setup("fit")
    return dm


def make_trainer(epochs: int, callbacks: list[Any]) -> L.Trainer:
    """The benchmark's Trainer: CPU, no logger, checkpoints, progress bar or validation."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


@contextlib.contextmanager
def _interrupts(trainer: L.Trainer) -> Iterator[None]:
    """Turn the ``sys.exit(1)`` that ends a Lightning fit or test interrupted by Ctrl-C back into the interrupt."""
    try:
        yield
    except SystemExit as err:
        if trainer.interrupted:
            raise KeyboardInterrupt from err
        raise


def run_one(method: str, scenario: str | Scenario, seed: int = 0, *, epochs: int | None = None) -> dict[str, Any]:
    """Train ``method`` on ``scenario`` with ``seed`` and test it.

    Args:
        method: a key of :data:`~lightning_reweight.bench.METHODS`.
        scenario: a key of :data:`~lightning_reweight.bench.SCENARIOS` or a :class:`Scenario`.
        seed: seeds the data split, the noise and the model.
        epochs: override the recipe's epochs.

    Returns:
        A record: method, scenario, seed, epochs, test accuracy, test balanced accuracy (both in %, last
        epoch), the best of each over the epochs and its epoch (:class:`TestCurve`), median step time in ms,
        steps timed, wall time, plus whatever the method's callbacks report through a
        ``benchmark_metrics()`` method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(METHODS)}")
    sc = SCENARIOS[scenario] if isinstance(scenario, str) else scenario
    recipe = sc.recipe if epochs is None else replace(sc.recipe, epochs=epochs)
    start = time.perf_counter()
    with quiet():
        L.seed_everything(seed, verbose=False)
        dm = make_datamodule(sc, seed)
        parts = METHODS[method].build(BuildContext(scenario=sc, recipe=recipe, datamodule=dm, seed=seed))
        backbone = MLP(64, dm.num_classes, hidden=recipe.hidden)
        if parts.normalized_head:
            backbone.classifier = NormalizedLinear(backbone.out_features, dm.num_classes)
        model = ReweightClassifier(
            backbone,
            dm.num_classes,
            criterion=parts.criterion,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        timer = StepTimer(skip_epochs=1 if recipe.epochs > 1 else 0)
        curve = TestCurve()
        trainer = make_trainer(recipe.epochs, [timer, *parts.callbacks, curve])
        with _interrupts(trainer):
            trainer.fit(model, datamodule=dm)
            (test,) = trainer.test(model, datamodule=dm, verbose=False)
    record: dict[str, Any] = {
        "method": method,
        "scenario": sc.name,
        "seed": seed,
        "epochs": recipe.epochs,
        "test_acc": 100.0 * float(test["test/acc"]),
        "test_balanced_acc": 100.0 * float(test["test/balanced_acc"]),
        "step_time_ms": timer.median_ms,
        "steps_timed": len(timer.times),
        **(curve.best() or {}),
        "wall_s": time.perf_counter() - start,
    }
    for cb in parts.callbacks:
        extra = getattr(cb, "benchmark_metrics", None)
        if callable(extra):
            record.update(extra())
    return record


def run_benchmark(
    methods: Sequence[str] | None = None,
    scenarios: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    *,
    epochs: int | None = None,
    progress: bool = True,
    done: Sequence[dict[str, Any]] = (),
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every applicable (method, scenario, seed) and return records with step-time ratios.

    The baseline (cross-entropy) runs first on every scenario and seed, in the same process, so each
    record's ``step_time_ratio`` is its median step time over the baseline's on the same scenario and seed.

    Args:
        methods: method keys (default: all registered); the baseline is added.
        scenarios: scenario keys (default: all).
        seeds: seeds.
        epochs: override the recipe's epochs.
        progress: show a progress bar.
        done: records of an interrupted run with the same settings (``--resume``): their jobs are not run again.
            A scenario and seed with jobs still to run gets its baseline run again, so that the new records'
            ratios are still measured in one process (the fresh baseline record replaces the old one).
        on_record: called with the result so far (``{"meta", "records"}``) after every run, e.g. to save it.

    Returns:
        ``{"meta": {...}, "records": [...]}``.
    """
    methods = list(methods) if methods else list(METHODS)
    scenarios = list(scenarios) if scenarios else list(SCENARIOS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; registered: {sorted(METHODS)}")
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; known: {sorted(SCENARIOS)}")
    if BASELINE in methods:
        methods.remove(BASELINE)
    methods.insert(0, BASELINE)
    jobs = [(m, s, seed) for s in scenarios for seed in seeds for m in methods if applicable(m, SCENARIOS[s])]
    finished = {(r["method"], r["scenario"], r["seed"]): dict(r) for r in done}
    pending = [job for job in jobs if job not in finished]
    rerun_baselines = {(s, seed) for m, s, seed in pending if m != BASELINE}
    pending = [job for job in jobs if job not in finished or (job[0] == BASELINE and job[1:] in rerun_baselines)]
    wanted, rerun = set(jobs), set(pending)
    records: list[dict[str, Any]] = [r for key, r in finished.items() if key in wanted and key not in rerun]
    baseline_ms: dict[tuple[str, int], float | None] = {}
    from tqdm.auto import tqdm

    meta = _meta(scenarios, seeds, epochs, resumed=bool(done))
    bar = tqdm(pending, desc="benchmark", unit="run", disable=not progress)
    for m, s, seed in bar:
        bar.set_postfix_str(f"{m} | {s} | seed {seed}")
        rec = run_one(m, s, seed, epochs=epochs)
        if m == BASELINE:
            baseline_ms[(s, seed)] = rec["step_time_ms"]
        base = baseline_ms.get((s, seed))
        rec["step_time_ratio"] = rec["step_time_ms"] / base if base and rec["step_time_ms"] else None
        records.append(rec)
        if on_record is not None:
            on_record({"meta": {**meta, "complete": False}, "records": list(records)})
    order = {job: k for k, job in enumerate(jobs)}
    records.sort(key=lambda r: order.get((r["method"], r["scenario"], r["seed"]), len(order)))
    return {"meta": {**meta, "complete": True}, "records": records}


def _meta(scenarios: Sequence[str], seeds: Sequence[int], epochs: int | None, resumed: bool) -> dict[str, Any]:
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "seeds": list(seeds),
        "scenarios": {s: {**asdict(SCENARIOS[s]), "tags": sorted(SCENARIOS[s].tags)} for s in scenarios},
        "epochs_override": epochs,
    }
    if resumed:
        meta["resumed"] = "records of an interrupted run were kept; each ratio is still measured in one process"
    return meta
