"""Markdown tables of a benchmark JSON file for the method pages: last- and best-epoch accuracy, weight AUROC.

Usage: ``python benchmarks/meta_tables.py FILE [SCENARIO ...]`` (default: every scenario in the file, in order).

Per scenario: last-epoch test accuracy, mean ± std over seeds with the difference to cross-entropy (``ce``) and
the number of seeds, then the best test accuracy over the epochs (the papers' model selection; records written
before the benchmark recorded it show ``-``). Long-tailed scenarios (``digits-lt*``) use balanced accuracy.
Then, for noisy scenarios whose records carry it, the weight AUROC at the last epoch / averaged over the epochs
after warm-up; the AUROC of the per-sample weight history over the whole run after warm-up (``SampleWeightHistory``:
mean within-batch percentile / share of visits with a positive weight); and the step-time ratio to cross-entropy,
averaged over every record of the method in the file.
"""

import json
import statistics
import sys
from pathlib import Path


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(path: str, scenarios: list[str] | None = None) -> str:
    records = json.loads(Path(path).read_text())["records"]
    scenarios = scenarios or list(dict.fromkeys(r["scenario"] for r in records))
    order = sorted(records, key=lambda r: (r["method"] != "ce", r["method"].split("-")[0]))  # stable: fd, fwd, 2nd
    methods = list(dict.fromkeys(r["method"] for r in order))
    by = {}
    for r in records:
        by.setdefault((r["method"], r["scenario"]), []).append(r)
    auroc = [s for s in scenarios if any(r.get("weight_auroc") is not None for r in records if r["scenario"] == s)]
    head = ["method"]
    for s in scenarios:
        head += [f"{s} last (Δ vs CE)", f"{s} best"]
    history = [s for s in auroc if any("sample_auroc_percentile" in r for r in records if r["scenario"] == s)]
    head += [f"{s} weight AUROC last / mean" for s in auroc]
    head += [f"{s} history AUROC percentile / positive share" for s in history] + ["step ratio (digits MLP)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in methods:
        cells = [m]
        for s in scenarios:
            recs = by.get((m, s), [])
            if not recs:
                cells += ["", ""]
                continue
            key = "test_balanced_acc" if s.startswith("digits-lt") else "test_acc"
            mean, std = _mean_std([r[key] for r in recs])
            base, _ = _mean_std([r[key] for r in by[("ce", s)]])
            cells.append(f"{mean:.2f} ± {std:.2f} ({mean - base:+.2f}, n={len(recs)})")
            best = [r[f"best_{key}"] for r in recs if f"best_{key}" in r]
            cells.append(f"{_mean_std(best)[0]:.2f} ± {_mean_std(best)[1]:.2f}" if len(best) == len(recs) else "-")
        for s in auroc:
            recs = [r for r in by.get((m, s), []) if r.get("weight_auroc") is not None]
            cells.append(
                f"{statistics.fmean(r['weight_auroc'] for r in recs):.3f} / "
                f"{statistics.fmean(r['weight_auroc_mean'] for r in recs):.3f}" if recs else "-"
            )
        for s in history:
            recs = [r for r in by.get((m, s), []) if "sample_auroc_percentile" in r]
            cells.append(
                f"{statistics.fmean(r['sample_auroc_percentile'] for r in recs):.3f} / "
                f"{statistics.fmean(r['sample_auroc_positive_share'] for r in recs):.3f}" if recs else "-"
            )
        ratios = [r["step_time_ratio"] for r in records if r["method"] == m and r.get("step_time_ratio")]
        cells.append(f"{statistics.fmean(ratios):.2f}" if ratios else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__.split("\n\n")[1])
    print(table(sys.argv[1], sys.argv[2:] or None))
