"""The benchmark scripts run end to end at tiny settings and write results files whose figures agree with their
own raw numbers (the scripts are what the docs' figures come from: an untested script rots between re-runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_step_time_resnet32_writes_each_modes_ratio_to_the_plain_step(tmp_path):
    out = tmp_path / "step_time.json"
    _run("step_time_resnet32.py", "--modes", "l2rw-finite_diff", "mwn-delayed-finite_diff", "--batch", "8",
         "--meta-batch", "8", "--steps", "1", "--repeats", "2", "--warmup", "0", "--no-memory", "--no-progress",
         "--output", str(out))
    modes = json.loads(out.read_text())["modes"]
    assert list(modes) == ["plain", "l2rw-finite_diff", "mwn-delayed-finite_diff"]
    for record in modes.values():
        assert record["steps_timed"] == 2 and record["median_ms"] > 0
        assert record["step_time_ratio"] == pytest.approx(record["median_ms"] / modes["plain"]["median_ms"])


def test_susceptibility_digits_writes_curves_acceptance_and_costs(tmp_path):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    _run("susceptibility_digits.py", "--epochs", "2", "--timing-epochs", "2", "--repeats", "1",
         "--paired-epochs", "4", "--out", str(out), "--png", str(png))
    result = json.loads(out.read_text())
    assert png.stat().st_size > 0
    noisy, clean = result["curves"]["digits-sym60"], result["curves"]["digits-clean"]
    assert [row["epoch"] for row in noisy] == [row["epoch"] for row in clean] == [0, 1]
    below = sum(c["memorization/zeta"] < n["memorization/zeta"] for c, n in zip(clean, noisy)) / len(noisy)
    acceptance = result["acceptance"]
    assert acceptance["clean_zeta_below_noisy_fraction"] == pytest.approx(below)
    assert acceptance["clean_zeta_below_noisy_every_epoch"] == (below == 1.0)
    shares = ("monitor_hook_share_of_epoch_core", "monitor_hook_share_of_epoch_default")
    assert all(0 < acceptance[key] < 1 for key in shares)
    assert acceptance["overhead_ok_default"] == (acceptance["paired_epoch_ratio_default"] <= 1.05)


def test_absgd_step_time_writes_both_routes(tmp_path):
    out = tmp_path / "a.json"
    _run("absgd_step_time.py", "--blocks", "2", "--steps", "2", "--pairs", "1", "--epochs", "1", "--output", str(out))
    result = json.loads(out.read_text())
    loop, trainer = result["loop"], result["trainer"]
    assert loop["ratio"] == pytest.approx(loop["absgd_ms"] / loop["ce_ms"])
    assert len(trainer["ratios"]) == 1 and trainer["median_ratio"] == pytest.approx(trainer["ratios"][0])
