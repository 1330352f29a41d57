"""The finite difference under TF32, emulated on CPU: why the engine switches TF32 off for its forwards.

Run from the repository root (a few seconds):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/fd_tf32_emulation.py

TF32 matmuls round their operands to 10 mantissa bits and accumulate in fp32. Here every linear layer of a trained
MLP rounds its input and weight that way (round to nearest; the exact forward-mode route sees the fp32 derivative),
and L2RW's finite-difference alignment is compared with the exact one, per ``fd_eps``, with and without the
rounding. Writes ``benchmarks/results/fd_tf32_emulation.json``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_reweight.meta import MetaProblem  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tf32_round(t: Tensor) -> Tensor:
    """``t`` rounded to TF32's 10-bit mantissa (nearest), with the identity as its derivative."""
    bits = t.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return t + (rounded - t).detach()


class RoundingLinear(nn.Linear):
    """``nn.Linear`` whose matmul operands are TF32-rounded while ``rounding`` is set."""

    rounding = False

    def forward(self, x: Tensor) -> Tensor:
        if not RoundingLinear.rounding:
            return super().forward(x)
        return F.linear(tf32_round(x), tf32_round(self.weight), self.bias)


def main() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(RoundingLinear(64, 128), nn.ReLU(), RoundingLinear(128, 128), nn.ReLU(),
                          RoundingLinear(128, 10))
    x_all = torch.randn(2048, 64)
    y_all = (x_all @ torch.randn(64, 10)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(300):  # a trained state, in plain fp32
        idx = torch.randint(0, 2048, (128,))
        opt.zero_grad()
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
    batch, meta = (x_all[:128], y_all[:128]), (x_all[1000:1128], y_all[1000:1128])

    def ce(b):
        return F.cross_entropy(model(b[0]), b[1], reduction="none")

    def alignment(hypergrad: str, **kw) -> Tensor:
        return MetaProblem(model, ce, lambda b: ce(b).mean(), batch, meta, hypergrad=hypergrad, **kw).alignment()

    results = {}
    for rounding in (False, True):
        RoundingLinear.rounding = rounding
        exact = alignment("forward").double()
        errors = {}
        for eps in (1e-2, 1e-3, 1e-4):
            fd = alignment("finite_diff", fd_eps=eps).double()
            errors[str(eps)] = float((fd - exact).norm() / exact.norm())
        results["tf32_emulated" if rounding else "fp32"] = errors
        print("tf32-emulated" if rounding else "fp32         ", {k: round(v, 4) for k, v in errors.items()})
    RoundingLinear.rounding = False
    return {
        "meta": {
            "command": "PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/fd_tf32_emulation.py",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "what": "relative error of L2RW's finite-difference alignment against the forward-mode route, per fd_eps",
        },
        "relative_error": results,
    }


if __name__ == "__main__":
    out = ROOT / "benchmarks" / "results" / "fd_tf32_emulation.json"
    out.write_text(json.dumps(main(), indent=1) + "\n")
    print(f"wrote {out}")
