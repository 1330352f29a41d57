"""Accuracy of the finite-difference hypergradient (``hypergrad="finite_diff"``) as a function of ``fd_eps``.

Run from the repository root (about 5 minutes on one CPU thread; ``--quick``: a smoke run under a minute):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/fd_accuracy.py

The finite difference takes ``G = J d`` as ``(l(theta + h d) - l(theta)) / h`` with a parameter perturbation of
norm ``|h d| = fd_eps * max(|theta|, 1)``: too large a step leaves the first-order regime (error in the length of
``G``), too small a one lets the fp32 rounding of the losses swamp small alignments (their signs flip, and L2RW
clips at 0). For each model and training state, on several batches, this compares against the exact value, the
forward-mode route (``"forward"``) run on a float64 copy of the model and batches (rounding ~1e-16):

- L2RW's alignment ``u_i = <grad l_i, grad L_meta>``: relative error, cosine, the fraction of samples on the other
  side of 0 (``u > 0`` differs: the samples L2RW keeps or drops), the same among the 25% of samples with the smallest
  exact ``|u|``; L2RW's weights ``max(u, 0) / sum``: relative error and L1 distance;
- MW-Net's meta gradient w.r.t. the meta-net (``lookahead=True``, hidden 100 and 8, the virtual step at the training
  lr): relative error and cosine.

The same metrics for the exact routes in fp32 (``"second_order"``, ``"forward"``) give the floor that fp32 itself
sets, and a two-sided difference ``(l(theta + h d) - l(theta - h d)) / 2h`` at the same step (not an engine route:
one more forward) shows what O(h^2) would give. Every metric is also recorded against the fp32 ``"second_order"``
route. Cases: the digits MLP of the benchmarks (40% symmetric noise) at init and after 1, 5, 20 and 60 epochs of
plain cross-entropy SGD; a small BatchNorm CNN (train mode) on a synthetic 3x16x16 task at init and after 300 and 1500
steps; ResNet-32 on CIFAR-shaped synthetic inputs at init and after 50 steps. ``--fd-eps`` and ``--cases`` select
other steps and a subset of the cases.

Writes ``benchmarks/results/fd_accuracy.json``: ``meta``, ``settings``, ``records`` (one per case, batch and route)
and ``summary`` (median and worst over batches per case and route).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lightning_reweight.data import DigitsDataModule  # noqa: E402
from lightning_reweight.meta import MetaWeightNet  # noqa: E402
from lightning_reweight.meta.engine import MetaProblem, capture_rng  # noqa: E402
from lightning_reweight.meta.l2rw import l2rw_from_alignment  # noqa: E402
from lightning_reweight.models import MLP, resnet32  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FD_EPS = (1e-3, 3e-4, 1e-4, 3e-5)
MWN_HIDDEN = (100, 8)
MWN_SEED = 1234  # the meta-net's initialisation, the same for every route
SMALL_QUANTILE = 0.25
EXACT_FP32 = ("second_order", "forward")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def norm(tensors: Sequence[Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def rel_err(got: Tensor, ref: Tensor) -> float:
    return float((got - ref).norm() / ref.norm()) if ref.norm() > 0 else float("nan")


def cosine(got: Tensor, ref: Tensor) -> float:
    return float(F.cosine_similarity(got, ref, dim=0))


def to64(batch: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.double() if t.is_floating_point() else t for t in batch)


# ---------------------------------------------------------------------------------------------------- the metrics
def alignment_metrics(u: Tensor, ref: Tensor) -> dict[str, float]:
    """L2RW's alignment ``u`` and its weights (what ``L2RW.meta_weights`` normalises) against ``ref`` (float64)."""
    kept, kept_ref = u > 0, ref > 0
    flip = kept != kept_ref
    k = max(1, round(SMALL_QUANTILE * ref.numel()))
    small = ref.abs().argsort()[:k]
    w, w_ref = l2rw_from_alignment(u), l2rw_from_alignment(ref)
    return {
        "l2rw_rel_err": rel_err(u, ref),
        "l2rw_cos": cosine(u, ref),
        "l2rw_sign_flip": float(flip.double().mean()),
        "l2rw_sign_flip_small25": float(flip[small].double().mean()),
        "w_rel_err": rel_err(w, w_ref),
        "w_l1": float((w - w_ref).abs().sum()),
    }


def gradient_metrics(prefix: str, got: Tensor, ref: Tensor) -> dict[str, float]:
    return {f"{prefix}_rel_err": rel_err(got, ref), f"{prefix}_cos": cosine(got, ref)}


# ---------------------------------------------------------------------------------------------------- the routes
def ce_of(net: nn.Module) -> Callable[[Sequence[Tensor]], Tensor]:
    return lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none")


def make_problem(net: nn.Module, batch: Sequence[Tensor], meta_batch: Sequence[Tensor], hypergrad: str,
                 rng: Any, fd_eps: float = 1e-3) -> MetaProblem:
    ce = ce_of(net)
    return MetaProblem(net, ce, lambda b: ce(b).mean(), batch, meta_batch, hypergrad=hypergrad, rng_state=rng,
                       fd_eps=fd_eps)


def central_directional(problem: MetaProblem, direction: Sequence[Tensor]) -> Tensor:
    """``(l(theta + h d) - l(theta - h d)) / 2h`` with the engine's step ``h`` (``fd_scale="all"``)."""
    theta = [p.detach() for p in problem.params]
    d_norm = norm(direction)
    if d_norm == 0.0:
        return torch.zeros(len(problem.train_batch[0]), dtype=torch.float64)
    h = problem.fd_eps * max(norm(theta), 1.0) / d_norm
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        plus = problem.train_losses_at([t + h * d for t, d in zip(theta, direction)])
        minus = problem.train_losses_at([t - h * d for t, d in zip(theta, direction)])
    return (plus - minus) / (2 * h)


def l2rw_alignment(problem: MetaProblem, central: bool = False) -> Tensor:
    if central:
        return central_directional(problem, problem.meta_gradient()).double()
    return problem.alignment().double()


def new_mwn(hidden: int, double: bool = False) -> MetaWeightNet:
    torch.manual_seed(MWN_SEED)
    mwn = MetaWeightNet(hidden=hidden)
    if double:
        mwn.weight_net.double()
    return mwn


def mwn_gradient(problem: MetaProblem, hidden: int, lr: float, double: bool = False, central: bool = False) -> Tensor:
    """MW-Net's meta gradient w.r.t. ``phi`` (``lookahead=True``); ``central``: ``G`` by a two-sided difference."""
    mwn = new_mwn(hidden, double)
    if not central:
        return flat(mwn.meta_gradient(problem, lr=lr))
    phi = list(mwn.weight_net.parameters())
    with torch.enable_grad():
        v = mwn.weight_net(problem.detached_losses())
        w = v / v.numel()  # MetaWeightNet(normalize=False)'s virtual weights
        direction = problem.meta_gradient(problem.virtual_params(w.detach(), lr))
        g = central_directional(problem, direction)
        return flat(torch.autograd.grad(-lr * (g.to(w.dtype) * w).sum(), phi))


# ---------------------------------------------------------------------------------------------------- one batch
def evaluate_batch(net: nn.Module, batch: Sequence[Tensor], meta_batch: Sequence[Tensor], lr: float,
                   fd_eps: Sequence[float]) -> list[dict[str, Any]]:
    """Every route's metrics on one training batch and one meta batch, one record per route."""
    rng = capture_rng()
    net64 = copy.deepcopy(net).double()
    b64, mb64 = to64(batch), to64(meta_batch)
    ref_problem = make_problem(net64, b64, mb64, "forward", rng)
    so_problem = make_problem(net, batch, meta_batch, "second_order", rng)
    ref_u = l2rw_alignment(ref_problem)
    so_u = l2rw_alignment(so_problem)
    ref_g = {h: mwn_gradient(ref_problem, h, lr, double=True) for h in MWN_HIDDEN}
    so_g = {h: mwn_gradient(so_problem, h, lr) for h in MWN_HIDDEN}
    with torch.no_grad():
        losses = ce_of(net64)(b64)
    info = {
        "theta_norm": norm([p.detach() for p in net.parameters()]),
        "loss_median": float(losses.median()),
        "loss_min": float(losses.min()),
        "batch_acc": float((net64(b64[0]).argmax(1) == b64[1]).double().mean()),
        "aligned_fraction": float((ref_u > 0).double().mean()),
        "u_abs_median": float(ref_u.abs().median()),
        "u_abs_max": float(ref_u.abs().max()),
    }

    def record(route: str, eps: float | None, u: Tensor, grads: dict[int, Tensor]) -> dict[str, Any]:
        vs64 = alignment_metrics(u, ref_u)
        vs_so = alignment_metrics(u, so_u)
        for h in MWN_HIDDEN:
            vs64 |= gradient_metrics(f"mwn{h}", grads[h], ref_g[h])
            vs_so |= gradient_metrics(f"mwn{h}", grads[h], so_g[h])
        return {"route": route, "fd_eps": eps, **info, "vs_f64": vs64, "vs_second_order_fp32": vs_so}

    out = [record("second_order_fp32", None, so_u, so_g)]
    fw = make_problem(net, batch, meta_batch, "forward", rng)
    out.append(record("forward_fp32", None, l2rw_alignment(fw), {h: mwn_gradient(fw, h, lr) for h in MWN_HIDDEN}))
    for eps in fd_eps:
        fd = make_problem(net, batch, meta_batch, "finite_diff", rng, eps)
        out.append(record("finite_diff", eps, l2rw_alignment(fd),
                          {h: mwn_gradient(fd, h, lr) for h in MWN_HIDDEN}))
        out.append(record("central_diff", eps, l2rw_alignment(fd, central=True),
                          {h: mwn_gradient(fd, h, lr, central=True) for h in MWN_HIDDEN}))
    return out


# ---------------------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """A model trained in stages, evaluated after each on fixed batches."""

    name: str
    net: nn.Module
    lr: float  # training lr and MW-Net's virtual step
    weight_decay: float
    train_batches: Callable[[], Iterator[tuple[Tensor, ...]]]  # one pass of training batches
    eval_batches: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]  # (training batch, meta batch)
    states: Sequence[int]  # cumulative passes (epochs) or steps at which to evaluate
    unit: str  # "epoch" or "step"


def train_until(case: Case, opt: torch.optim.Optimizer, done: int, target: int) -> int:
    """Plain cross-entropy SGD from ``done`` to ``target`` epochs or steps; returns ``target``."""
    case.net.train()
    while done < target:
        for batch in case.train_batches():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(case.net(batch[0]), batch[1]).backward()
            opt.step()
            if case.unit == "step":
                done += 1
                if done == target:
                    return done
        if case.unit == "epoch":
            done += 1
    return done


def digits_case(states: Sequence[int], n_batches: int) -> Case:
    dm = DigitsDataModule(noise_rate=0.4, noise_kind="symmetric", batch_size=100, meta_batch_size=100,
                          meta_per_class=10, seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    net = MLP(64, dm.num_classes, hidden=(256, 256))
    train = [b[:2] for _, b in zip(range(n_batches), dm.train_dataloader())]
    meta = [tuple(b) for _, b in zip(range(n_batches), cycle(dm.meta_dataloader))]

    def passes() -> Iterator[tuple[Tensor, ...]]:
        for b in dm.train_dataloader():
            yield b[0], b[1]

    return Case("digits-mlp-sym40", net, 0.05, 5e-4, passes, list(zip(train, meta)), states, "epoch")


def cycle(loader_fn: Callable[[], Any]) -> Iterator[Any]:
    while True:
        yield from loader_fn()


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 (16, 32, 32 channels, two stride-2), global average pool, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in ((3, 16, 1), (16, 32, 2), (32, 32, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def synthetic_task(n: int, size: int, seed: int, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Smooth random images, labelled by a fixed random linear teacher on their 4x4-pooled version (no label noise)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3 * 16, num_classes, generator=torch.Generator().manual_seed(999))
    x = F.interpolate(torch.randn(n, 3, size // 4, size // 4, generator=g), size=(size, size), mode="bilinear",
                      align_corners=False)
    x = x + 0.3 * torch.randn(n, 3, size, size, generator=g)
    y = (F.adaptive_avg_pool2d(x, 4).reshape(n, -1) @ teacher).argmax(1)
    return x, y


def synthetic_case(name: str, net: nn.Module, size: int, batch: int, meta_batch: int, n_train: int, lr: float,
                   states: Sequence[int], n_batches: int) -> Case:
    x, y = synthetic_task(n_train, size, seed=0)
    mx, my = synthetic_task(meta_batch * n_batches, size, seed=1)
    order = torch.Generator().manual_seed(2)

    def passes() -> Iterator[tuple[Tensor, ...]]:
        perm = torch.randperm(n_train, generator=order)
        for i in range(0, n_train - batch + 1, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]

    evals = [((x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]),
              (mx[i * meta_batch:(i + 1) * meta_batch], my[i * meta_batch:(i + 1) * meta_batch]))
             for i in range(n_batches)]
    return Case(name, net, lr, 5e-4, passes, evals, states, "step")


CASES = ("digits-mlp-sym40", "small-bn-cnn-3x16x16", "resnet32-3x32x32")


def build_cases(quick: bool, names: Sequence[str]) -> list[Case]:
    n = 2 if quick else 5
    cases = []
    if CASES[0] in names:
        cases.append(digits_case((0, 1) if quick else (0, 1, 5, 20, 60), n))
    if CASES[1] in names:
        torch.manual_seed(0)
        cases.append(synthetic_case(CASES[1], SmallCNN(), 16, 100, 100, 2000, 0.05,
                                    (0, 50) if quick else (0, 300, 1500), n))
    if CASES[2] in names:
        torch.manual_seed(0)
        cases.append(synthetic_case(CASES[2], resnet32(), 32, 8 if quick else 32, 8 if quick else 32, 640, 0.1,
                                    (0,) if quick else (0, 50), 1 if quick else 3))
    return cases


# ---------------------------------------------------------------------------------------------------- summary
def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and worst (max of errors and flips, min of cosines) over batches, per case, state and route."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        route = r["route"] if r["fd_eps"] is None else f"{r['route']}@{r['fd_eps']:g}"
        groups.setdefault((f"{r['case']}/{r['unit']}{r['state']}", route), []).append(r)
    out: dict[str, Any] = {}
    for (case, route), rs in groups.items():
        entry: dict[str, Any] = {"batches": len(rs)}
        for ref in ("vs_f64", "vs_second_order_fp32"):
            entry[ref] = {}
            for key in rs[0][ref]:
                values = [r[ref][key] for r in rs]
                worst = min(values) if key.endswith("_cos") else max(values)
                entry[ref][key] = {"median": statistics.median(values), "worst": worst}
        out.setdefault(case, {})[route] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/fd_accuracy.json")
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer states, batches, a smaller ResNet batch")
    ap.add_argument("--fd-eps", type=float, nargs="+", default=list(FD_EPS), help="the fd_eps values compared")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    cases = build_cases(args.quick, args.cases)
    for case in cases:
        opt = torch.optim.SGD(case.net.parameters(), lr=case.lr, momentum=0.9, weight_decay=case.weight_decay)
        done = 0
        for state in case.states:
            t0 = time.perf_counter()
            done = train_until(case, opt, done, state)
            trained = time.perf_counter() - t0
            case.net.train()  # BatchNorm in train mode, as in a training step
            for i, (batch, meta_batch) in enumerate(case.eval_batches):
                t1 = time.perf_counter()
                for r in evaluate_batch(case.net, batch, meta_batch, case.lr, args.fd_eps):
                    records.append({"case": case.name, "unit": case.unit, "state": state, "batch": i, **r})
                fd = [r for r in records[-2 - 2 * len(args.fd_eps):] if r["route"] == "finite_diff"]
                log(f"{case.name} {case.unit} {state} batch {i} ({trained:.0f}s training, "
                    f"{time.perf_counter() - t1:.1f}s): loss median {fd[0]['loss_median']:.3f}, L2RW rel err "
                    + " ".join(f"{r['fd_eps']:g}:{r['vs_f64']['l2rw_rel_err']:.1e}" for r in fd) + "; flips "
                    + " ".join(f"{r['vs_f64']['l2rw_sign_flip']:.2f}" for r in fd) + "; MW-Net100 rel err "
                    + " ".join(f"{r['vs_f64']['mwn100_rel_err']:.1e}" for r in fd))
                trained = 0.0
    wall = time.perf_counter() - start
    result = {
        "meta": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/fd_accuracy.py",
                                 *map(shlex.quote, sys.argv[1:])]).strip(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "wall_s": round(wall, 1),
        },
        "settings": {
            "fd_eps": args.fd_eps,
            "fd_scale": "all",
            "reference": "hypergrad='forward' on a float64 copy of the model and batches (vs_f64); every metric "
                         "also against hypergrad='second_order' in fp32 (vs_second_order_fp32)",
            "routes": {
                "second_order_fp32": "exact route, fp32 (the floor fp32 sets)",
                "forward_fp32": "exact route, fp32",
                "finite_diff": "the engine's one-sided difference at fd_eps",
                "central_diff": "(l(theta+hd) - l(theta-hd)) / 2h at the engine's h for fd_eps (not an engine route)",
            },
            "sign_flip": "fraction of samples with (u > 0) != (u_ref > 0); small25: among the 25% smallest |u_ref|",
            "weights": "L2RW weights max(u, 0) / sum max(u, 0)",
            "mwn": {"hidden": list(MWN_HIDDEN), "lookahead": True, "normalize": False, "init_seed": MWN_SEED,
                    "virtual_lr": "the case's training lr"},
            "cases": [
                {"name": c.name, "lr": c.lr, "momentum": 0.9, "weight_decay": c.weight_decay, "unit": c.unit,
                 "states": list(c.states), "batches": len(c.eval_batches),
                 "batch_size": len(c.eval_batches[0][0][0]), "meta_batch_size": len(c.eval_batches[0][1][0]),
                 "parameters": sum(p.numel() for p in c.net.parameters())}
                for c in cases
            ],
            "case_notes": {
                "digits-mlp-sym40": "MLP(64, 10, hidden=(256, 256)); DigitsDataModule(noise_rate=0.4, "
                                    "noise_kind='symmetric', batch 100, meta batch 100, seed 0); the first batches "
                                    "of the training loader; plain CE SGD between states (60 epochs: the "
                                    "benchmarks' recipe length)",
                "small-bn-cnn-3x16x16": "3 conv-BN-ReLU layers, train mode; 2000 synthetic images labelled by a "
                                        "fixed random linear teacher (no noise); batch 100",
                "resnet32-3x32x32": "lightning_reweight.models.resnet32, train mode; 640 synthetic 3x32x32 images, "
                                    "same teacher; batch 32, meta batch 32",
            },
            "quick": args.quick,
        },
        "records": records,
        "summary": summarise(records),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.output} ({wall:.0f}s)")


if __name__ == "__main__":
    main()
