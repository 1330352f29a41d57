"""Merge the digits benchmark JSON files into Markdown tables (mean ± std over seeds).

Usage: ``python benchmarks/summarise.py [--best] [FILES...]`` (default: every ``benchmarks/results/*.json`` with
records). Records of the same (method, scenario, seed) found in several files are counted once (the first file
wins), so the cross-entropy baseline that every run repeats is not double counted. The table shows last-epoch
test accuracy; ``--best`` shows the best test accuracy over the epochs instead, from the records that carry it
(the papers' model selection), first file among those wins.
"""

import json
import sys
from pathlib import Path

from lightning_reweight.bench.report import summarise

SCENARIOS = ["digits-clean", "digits-sym40", "digits-sym60", "digits-pair40", "digits-lt10", "digits-lt50"]


def main(paths: list[str], best: bool = False) -> str:
    files = [Path(p) for p in paths] or sorted(Path("benchmarks/results").glob("*.json"))
    records: dict[tuple[str, str, int], dict] = {}
    for f in files:
        for r in json.loads(f.read_text()).get("records", []):
            if not {"method", "scenario", "seed"} <= r.keys():  # another benchmark's records (fd_accuracy.json)
                continue
            if not best or "best_test_acc" in r:
                records.setdefault((r["method"], r["scenario"], r["seed"]), r)
    rows = summarise(records.values())
    methods = list(dict.fromkeys(r["method"] for r in sorted(rows, key=lambda r: r["method"] != "ce")))
    cell = {(r["method"], r["scenario"]): r for r in rows}
    present = [s for s in SCENARIOS if any(k[1] == s for k in cell)]
    lines = ["| method | " + " | ".join(present) + " |", "|---" * (len(present) + 1) + "|"]
    for m in methods:
        vals = []
        for s in present:
            r = cell.get((m, s))
            key = "test_balanced_acc" if s.startswith("digits-lt") else "test_acc"
            key = f"best_{key}" if best else key
            vals.append("" if r is None else f"{r[key + '_mean']:.1f} ± {r[key + '_std']:.1f} ({r['seeds']})")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(main([a for a in args if a != "--best"], best="--best" in args))
