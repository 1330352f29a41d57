"""Summaries of benchmark records: mean and spread over seeds, as a table or JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_table", "summarise", "write_json"]


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group records by (scenario, method) and average over seeds.

    Example:
        >>> rows = summarise([
        ...     {"method": "ce", "scenario": "s", "seed": 0, "test_acc": 90.0, "test_balanced_acc": 80.0,
        ...      "step_time_ratio": 1.0},
        ...     {"method": "ce", "scenario": "s", "seed": 1, "test_acc": 92.0, "test_balanced_acc": 82.0,
        ...      "step_time_ratio": 1.0},
        ... ])
        >>> rows[0]["test_acc_mean"], rows[0]["seeds"]
        (91.0, 2)
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    rows = []
    for (scenario, method), recs in groups.items():
        row: dict[str, Any] = {"scenario": scenario, "method": method, "seeds": len(recs)}
        for key in ("test_acc", "test_balanced_acc", "best_test_acc", "best_test_balanced_acc", "step_time_ratio"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.get(key) for r in recs])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`summarise` rows.

    Columns: scenario, method, last-epoch accuracy and balanced accuracy, best-epoch accuracy (``nan`` for
    records without one), step-time ratio, seeds.
    """
    header = (
        f"{'scenario':<14} {'method':<22} {'test acc %':>14} {'balanced acc %':>15} {'best acc %':>14} "
        f"{'step x CE':>10} {'seeds':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r["step_time_ratio_mean"]
        best, best_std = r.get("best_test_acc_mean", math.nan), r.get("best_test_acc_std", math.nan)
        lines.append(
            f"{r['scenario']:<14} {r['method']:<22} "
            f"{r['test_acc_mean']:>7.2f} ± {r['test_acc_std']:<4.2f} "
            f"{r['test_balanced_acc_mean']:>8.2f} ± {r['test_balanced_acc_std']:<4.2f} "
            f"{best:>7.2f} ± {best_std:<4.2f} "
            f"{ratio:>10.2f} {r['seeds']:>5}"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``{"meta", "records", "summary"}`` to ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**result, "summary": summarise(result["records"])}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)  # atomic: a crash while writing leaves the previous file whole
    return path
