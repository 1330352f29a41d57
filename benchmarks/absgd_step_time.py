"""Step-time ratio of ABSGD to plain cross-entropy, measured interleaved so that machine-load drift cancels.

Two measurements, both in one process:

* ``loop``: a bare training loop (``training_step`` + backward + SGD step of ``ReweightClassifier`` on a digits-sized
  MLP batch), alternating blocks of steps between CE and ABSGD; ratio of median step times. No Lightning
  overhead in the denominator, so this overstates the ratio a Trainer would see.
* ``trainer``: the benchmark runner's ``run_one`` (full Lightning training on digits-sym60), alternating CE and
  ``absgd-neg`` runs; median over pairs of the per-pair ratio of median step times.

Usage::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/absgd_step_time.py \
        --output benchmarks/results/absgd_step_time.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lightning_reweight import ReweightClassifier
from lightning_reweight.losses import AttentionalDROLoss
from lightning_reweight.models import MLP


def loop_ratio(blocks: int, steps: int, lam: float) -> dict[str, float]:
    batch = (torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,)), torch.arange(100))
    runs = {}
    for name, criterion in (("ce", None), ("absgd", AttentionalDROLoss(lam=lam))):
        torch.manual_seed(0)
        model = ReweightClassifier(MLP(64, 10, hidden=(256, 256)), 10, criterion=criterion)
        runs[name] = (model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for block in range(blocks + 1):
        for name in (("ce", "absgd") if block % 2 else ("absgd", "ce")):
            model, opt = runs[name]
            for _ in range(steps):
                start = time.perf_counter()
                opt.zero_grad()
                model.training_step(batch, 0).backward()
                opt.step()
                if block:  # block 0 warms up
                    times[name].append(time.perf_counter() - start)
    ce, ab = statistics.median(times["ce"]), statistics.median(times["absgd"])
    return {"ce_ms": 1e3 * ce, "absgd_ms": 1e3 * ab, "ratio": ab / ce, "steps_each": len(times["ce"])}


def trainer_ratio(pairs: int, epochs: int) -> dict[str, object]:
    from lightning_reweight.bench import run_one

    ratios, rows = [], []
    for i in range(pairs):
        order = ("ce", "absgd-neg") if i % 2 == 0 else ("absgd-neg", "ce")
        ms = {m: run_one(m, "digits-sym60", seed=i, epochs=epochs)["step_time_ms"] for m in order}
        ratios.append(ms["absgd-neg"] / ms["ce"])
        rows.append(ms)
    return {"scenario": "digits-sym60", "epochs": epochs, "pairs": rows, "ratios": ratios,
            "median_ratio": statistics.median(ratios)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--output", default="benchmarks/results/absgd_step_time.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {
        "meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)},
        "loop": loop_ratio(args.blocks, args.steps, lam=-1.0),
        "trainer": trainer_ratio(args.pairs, args.epochs),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    summary = {"loop_ratio": result["loop"]["ratio"], "trainer_median_ratio": result["trainer"]["median_ratio"]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
