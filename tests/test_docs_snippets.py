"""Every Python code block of README.md and docs/ runs as written.

Most blocks are fragments that assume a user's context (a ``datamodule``, a ``backbone``, ``import lightning as L``):
they run in a namespace that provides those names, with the digits data. ``lightning.Trainer`` is replaced by one
that trains a couple of batches for one epoch, so a block that calls ``fit`` checks its wiring, not its recipe.
Blocks that start indented (a method shown on its own) are left out.
"""

from __future__ import annotations

import re
import textwrap
import warnings
from pathlib import Path

import lightning
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

PREAMBLE = textwrap.dedent(
    """
    import lightning as L
    import torch
    from torch import nn
    from torch.nn import functional as F
    from lightning_reweight import ReweightClassifier
    from lightning_reweight.data import DigitsDataModule
    from lightning_reweight.models import MLP

    datamodule = dm = DigitsDataModule(noise_rate=0.4, meta_per_class=10)  # not set up: as a user has it
    num_classes = 10
    backbone = MLP(64, num_classes, hidden=(16,))
    model = ReweightClassifier(MLP(64, num_classes, hidden=(16,)), num_classes=num_classes)
    """
)


def blocks() -> list:
    found = []
    for page in PAGES:
        for i, code in enumerate(BLOCK.findall(page.read_text())):
            if code[:1].isspace():  # an indented method on its own
                continue
            found.append(pytest.param(code, id=f"{page.relative_to(ROOT)}#{i}"))
    return found


class ShortTrainer(lightning.Trainer):
    """The documented Trainer, cut to one epoch of two batches, quiet, writing under the test's directory."""

    root: Path = Path(".")

    def __init__(self, *args, **kwargs):
        kwargs.update(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=self.root)
        super().__init__(*args, **kwargs)


def test_the_pages_have_code_blocks():
    assert len(blocks()) >= 10  # the pattern finds the blocks (a changed fence style would empty the test)


@pytest.mark.parametrize("code", blocks())
def test_code_block_runs(code, tmp_path, monkeypatch):
    ShortTrainer.root = tmp_path
    monkeypatch.setattr(lightning, "Trainer", ShortTrainer)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(PREAMBLE, "<preamble>", "exec"), namespace)
        exec(compile(code, "<block>", "exec"), namespace)
