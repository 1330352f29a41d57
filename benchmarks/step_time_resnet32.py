"""Step time and peak memory of one training step of ResNet-32 per method, as ratios to plain training.

CIFAR-shaped: ResNet-32, batch 128 of 3x32x32 inputs, meta batch 100, SGD (lr 0.1, momentum 0.9, wd 5e-4). Each
mode is a *step factory* in :data:`MODES` (name -> factory(model, optimizer) -> step(batch, meta_batch)); add a
row by adding an entry (e.g. from another method's branch). A step does what one Lightning training step does
(per-sample losses, the weighting, the weighted mean, backward, optimizer step) in plain PyTorch, without the
Trainer's fixed overhead, which would flatter every ratio.

Timing: every mode is timed in this one process, interleaved (mode A, B, C, ..., then again) for ``--repeats``
rounds of ``--steps`` steps after ``--warmup`` untimed steps; the figure is the median step time, and the ratio
is over the median of ``plain``. Peak memory: each mode also runs 2 steps in a fresh subprocess (``--only MODE``)
whose peak resident set size (Linux ``VmHWM``, which unlike ``ru_maxrss`` is not inherited from the forking
parent) is reported, together with that of an idle subprocess (imports, model and data, no step) so that
``peak_rss_over_idle_ratio`` compares the memory the steps themselves need; on CUDA, the peak allocated memory
(``torch.cuda.max_memory_allocated``) in this process.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/step_time_resnet32.py``
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_reweight.functional import class_balanced_weights
from lightning_reweight.losses import AttentionalDROLoss, LDAMLoss, LogitAdjustedLoss
from lightning_reweight.meta import L2RW, MetaProblem, MetaStrategy, MetaWeightNet, capture_rng
from lightning_reweight.models import resnet32

Batch = tuple[Tensor, Tensor]
Step = Callable[[Batch, Batch], None]
StepFactory = Callable[[nn.Module, torch.optim.Optimizer], Step]

RESULTS = Path(__file__).resolve().parent / "results" / "step_time_resnet32.json"


def plain_step(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
    """Plain cross-entropy training step (the denominator of every ratio)."""

    def step(batch: Batch, meta: Batch) -> None:
        x, y = batch
        loss = F.cross_entropy(model(x), y, reduction="none").mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def meta_step(strategy: Callable[[], MetaStrategy], hypergrad: str, early: bool = True) -> StepFactory:
    """A reweighted step, in the order :class:`~lightning_reweight.callbacks.MetaReweight` runs it: the alignment
    prepared before the training forward for strategies that need only that (``on_train_batch_start``); the
    training forward's per-sample losses handed to the engine (inside ``training_step``); for a delayed strategy
    (``MetaWeightNet(delayed=True)``) the batch weighted with the current meta-net and the meta update run after
    the backward pass with its gradient (``on_before_optimizer_step``). ``early=False`` computes the alignment
    after the training forward instead (the order before it was prepared early)."""

    def factory(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
        strat = strategy().to(next(model.parameters()).device)

        def per_sample(b: Batch) -> Tensor:
            return F.cross_entropy(model(b[0]), b[1], reduction="none")

        def step(batch: Batch, meta: Batch) -> None:
            rng = capture_rng(batch[0].device)
            problem = MetaProblem(model, per_sample, lambda b: per_sample(b).mean(), batch, meta,
                                  hypergrad=hypergrad, rng_state=rng, reuse_graph=not strat.delayed)
            if early and strat.early_alignment:
                problem.prepare()
            losses = per_sample(batch)
            problem.attach_losses(losses.detach() if strat.delayed else losses)
            lr = opt.param_groups[0]["lr"]
            w = strat.weights(losses.detach()) if strat.delayed else strat.meta_weights(problem, lr=lr)
            loss = (w.detach() * losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if strat.delayed:
                strat.meta_update(problem, lr, [p.grad for p in problem.params])
            opt.step()

        return step

    return factory


def criterion_step(make_criterion: Callable[[], nn.Module]) -> StepFactory:
    """A step with a loss module that reduces to a scalar itself (ABSGD's attentional loss, LDAM)."""

    def factory(model: nn.Module, opt: torch.optim.Optimizer) -> Step:
        criterion = make_criterion().to(next(model.parameters()).device)

        def step(batch: Batch, meta: Batch) -> None:
            loss = criterion(model(batch[0]), batch[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    return factory


#: CIFAR-10-LT (imbalance 100) class counts, for the long-tail losses' margins and weights
_LT_COUNTS = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]

#: mode name -> step factory; extend with more rows
MODES: dict[str, StepFactory] = {
    "plain": plain_step,
    "absgd": criterion_step(lambda: AttentionalDROLoss(lam=1.0, gamma=0.9)),
    "ldam-drw": criterion_step(lambda: LDAMLoss(_LT_COUNTS, weight=class_balanced_weights(_LT_COUNTS))),
    "logit-adj": criterion_step(lambda: LogitAdjustedLoss(_LT_COUNTS)),
}
for _hg in ("finite_diff", "forward", "second_order"):
    MODES[f"l2rw-{_hg}"] = meta_step(L2RW, _hg)
    MODES[f"mwn-{_hg}"] = meta_step(MetaWeightNet, _hg)
    MODES[f"mwn-fo-{_hg}"] = meta_step(lambda: MetaWeightNet(lookahead=False), _hg)  # first order: no virtual step
for _hg in ("finite_diff", "forward"):  # delayed: the virtual step reuses the real backward's gradient
    MODES[f"mwn-delayed-{_hg}"] = meta_step(lambda: MetaWeightNet(delayed=True), _hg)
for _hg in ("finite_diff", "forward"):  # L2RW's alignment after the training forward, while its graph is alive
    MODES[f"l2rw-late-{_hg}"] = meta_step(L2RW, _hg, early=False)


def make(batch: int, meta_batch: int, device: str, seed: int = 0) -> tuple[nn.Module, Batch, Batch]:
    """A ResNet-32 in train mode and a random CIFAR-shaped batch and meta batch."""
    torch.manual_seed(seed)
    model = resnet32(num_classes=10).to(device).train()
    g = torch.Generator().manual_seed(seed)
    b = (torch.randn(batch, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
    m = (torch.randn(meta_batch, 3, 32, 32, generator=g).to(device),
         torch.randint(0, 10, (meta_batch,), generator=g).to(device))
    return model, b, m


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(modes: list[str], batch: int, meta_batch: int, device: str, steps: int, repeats: int,
               warmup: int, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Median step time per mode, modes interleaved within each repeat."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(modes) * (warmup + repeats * steps), desc="timing", unit="step", disable=not progress)
    runners: dict[str, Step] = {}
    data: dict[str, tuple[Batch, Batch]] = {}
    for name in modes:
        model, b, m = make(batch, meta_batch, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        runners[name] = MODES[name](model, opt)
        data[name] = (b, m)
        for _ in range(warmup):
            runners[name](b, m)
            bar.update()
    times: dict[str, list[float]] = {n: [] for n in modes}
    peak: dict[str, int | None] = {}
    for _ in range(repeats):
        for name in modes:
            b, m = data[name]
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                runners[name](b, m)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                bar.update()
            peak[name] = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    bar.close()
    return {n: {"median_ms": 1000 * statistics.median(t), "steps_timed": len(t), "cuda_peak_bytes": peak[n]}
            for n, t in times.items()}


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_rss_subprocess(mode: str, batch: int, meta_batch: int, device: str) -> int:
    """Peak resident set size (bytes) of a fresh process that builds the model and runs 2 steps of ``mode``
    (``mode="idle"``: no step)."""
    out = subprocess.run(
        [sys.executable, __file__, "--only", mode, "--batch", str(batch), "--meta-batch", str(meta_batch),
         "--device", device], capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line entry point; writes the JSON unless ``--only``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--meta-batch", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-mode subprocesses")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.only:  # child process: 2 steps, print peak RSS in bytes
        model, b, m = make(args.batch, args.meta_batch, args.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if args.only != "idle":
            step = MODES[args.only](model, opt)
            for _ in range(2):
                step(b, m)
        print(peak_rss())
        return {}
    modes = ["plain", *[m for m in args.modes if m != "plain"]]
    memory: dict[str, int] = {}
    if not args.no_memory:  # before the timing, while this process is small
        from tqdm.auto import tqdm

        for name in tqdm(["idle", *modes], desc="peak memory", unit="mode", disable=args.no_progress):
            memory[name] = peak_rss_subprocess(name, args.batch, args.meta_batch, args.device)
    res = time_modes(modes, args.batch, args.meta_batch, args.device, args.steps, args.repeats, args.warmup,
                     progress=not args.no_progress)
    base = res["plain"]["median_ms"]
    for name in modes:
        res[name]["step_time_ratio"] = res[name]["median_ms"] / base
        if res[name]["cuda_peak_bytes"] and res["plain"]["cuda_peak_bytes"]:
            res[name]["cuda_peak_ratio"] = res[name]["cuda_peak_bytes"] / res["plain"]["cuda_peak_bytes"]
        if memory:
            res[name]["peak_rss_bytes"] = memory[name]
            res[name]["peak_rss_ratio"] = memory[name] / memory["plain"]
            res[name]["peak_rss_over_idle_ratio"] = (memory[name] - memory["idle"]) / (memory["plain"] - memory["idle"])
    record = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/step_time_resnet32.py "
                       + " ".join(argv if argv is not None else sys.argv[1:]),
            "torch": torch.__version__,
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "threads": torch.get_num_threads(),
            "batch": args.batch, "meta_batch": args.meta_batch, "steps": args.steps, "repeats": args.repeats,
            "timing": "median step time over interleaved repeats, one process; ratio = mode / plain",
            "memory": "peak_rss_bytes: VmHWM of a fresh subprocess running 2 steps of the mode; "
                      "peak_rss_over_idle_ratio: (peak - idle) / (plain peak - idle), idle = same process, no step",
            "idle_rss_bytes": memory.get("idle"),
        },
        "modes": res,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    for name in modes:
        r = res[name]
        print(f"{name:20s} {r['median_ms']:9.1f} ms  x{r['step_time_ratio']:.2f}"
              + (f"  rss x{r['peak_rss_ratio']:.2f} (over idle x{r['peak_rss_over_idle_ratio']:.2f})"
                 if "peak_rss_ratio" in r else ""))
    return record


if __name__ == "__main__":
    main()
