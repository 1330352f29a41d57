"""The example scripts run end to end (a couple of epochs each) and print figures in their valid ranges."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PERCENT = r"(\d+\.\d+)%"

CASES = {
    "absgd": (["absgd_digits.py", "--epochs", "2", "--start-epoch", "1"], r"test acc " + PERCENT),
    "ldam-drw": (["ldam_drw_digits.py", "--epochs", "2"], r"^ldam-drw\s+(\d+\.\d+)"),
    # MW-Net's 5-epoch warm-up outlasts a 2-epoch run: the script must say there was no meta step, not crash
    "mwn-in-warmup": (["meta_reweight_digits.py", "--epochs", "2"], r"test accuracy " + PERCENT + r".*n/a"),
    "l2rw-forward": (
        ["meta_reweight_digits.py", "--method", "l2rw", "--hypergrad", "forward", "--epochs", "1"],
        r"test accuracy " + PERCENT + r".*AUROC \(last epoch\) [01]\.\d+\nweight history: AUROC [01]\.\d+; \d+ of ",
    ),
    "susceptibility": (["susceptibility_digits.py", "--epochs", "2"], r"epoch 1: zeta -?\d"),
    # without noise there is no noisy subset and no AUROC: the scripts say so instead of raising a KeyError
    "l2rw-no-noise": (["meta_reweight_digits.py", "--method", "l2rw", "--epochs", "1", "--noise", "0"],
                      r"test accuracy " + PERCENT + r".*n/a \(no noisy samples\)"),
    "susceptibility-no-noise": (["susceptibility_digits.py", "--epochs", "2", "--noise-rate", "0"],
                                r"epoch 1: zeta -?\d.*train acc clean subset 0?\.\d+\n"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_example_runs(case, tmp_path):
    args, pattern = CASES[case]
    if args[0] == "susceptibility_digits.py":
        pytest.importorskip("wandb")
        args = [*args, "--wandb-dir", str(tmp_path / "wb")]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / args[0]), *args[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(pattern, result.stdout, flags=re.MULTILINE)
    assert match is not None, f"{pattern!r} not in the output:\n{result.stdout[-2000:]}"
    if match.groups():
        assert 0.0 <= float(match.group(1)) <= 100.0
    if args[0] == "susceptibility_digits.py":
        assert list((tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run written"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_examples_refuse_a_number_of_epochs_below_one(script):
    """``--epochs 0`` tested an untrained model without a word and ``--epochs -1`` trained forever (Lightning reads
    ``max_epochs=-1`` as no limit). One of the two values per script (each run imports torch and Lightning)."""
    epochs = "0" if sorted(p.name for p in EXAMPLES.glob("*.py")).index(script) % 2 else "-1"
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--epochs", epochs], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 2 and "--epochs must be >= 1" in result.stderr, result.stderr[-2000:]
