"""Run the digits benchmark (every registered method, every scenario, 5 seeds) and write the JSON results.

Usage:
    python benchmarks/digits.py [--methods ...] [--scenarios ...] [--seeds 0 1 2 3 4] [--output PATH]

Same as ``lightning-reweight benchmark --preset full --output benchmarks/results/digits.json``.
"""

import sys

from lightning_reweight.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--output" not in args:
        args += ["--output", "benchmarks/results/digits.json"]
    if "--preset" not in args:
        args += ["--preset", "full"]
    raise SystemExit(main(["benchmark", *args]))
