"""Run by tests/test_meta_callbacks.py: 2-process DDP (gloo) fits with MW-Net then L2RW; each rank saves state."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_meta_callbacks import flat, loaders, module  # noqa: E402

from lightning_reweight.callbacks import MetaReweight  # noqa: E402
from lightning_reweight.meta import L2RW, MetaWeightNet  # noqa: E402

warnings.filterwarnings("ignore")
out = sys.argv[1]
L.seed_everything(0, verbose=False)
for name, strategy in (("mwn", MetaWeightNet(hidden=8)), ("l2rw", L2RW())):
    train, meta = loaders()
    model = module()
    cb = MetaReweight(strategy, meta_dataloader=meta, hypergrad="finite_diff")
    init = flat(strategy).clone() if name == "mwn" else torch.zeros(0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, train)
    torch.save({"meta": flat(strategy).clone() if name == "mwn" else torch.zeros(0), "init": init,
                "model": flat(model).clone(), "steps": cb.state_dict()["meta_steps"],
                "weights": model.last_sample_weights.clone()},
               f"{out}/{name}_rank{trainer.global_rank}.pt")
