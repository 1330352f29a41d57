"""Run by tests/test_data_loaders.py: 2-process DDP (gloo) fits on a toy ReweightDataModule with a loader worker;
each rank saves the dataset indices it trained on per epoch, the draws of a random transform in its workers, and
its batch losses beside the logged epoch loss."""

from __future__ import annotations

import sys
import warnings

import lightning as L
import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _toy_random_transform import Toy  # noqa: E402

from lightning_reweight.classifier import ReweightClassifier  # noqa: E402

warnings.filterwarnings("ignore")
out = sys.argv[1]


class Recorder(ReweightClassifier):
    """Records the dataset indices of each epoch, the transformed inputs and each batch's (mean loss, size)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(1, 2), num_classes=2, lr=0.1)
        self.seen: list[list[int]] = []
        self.draws: list[float] = []
        self.losses: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        if batch_idx == 0:
            self.seen.append([])
            self.losses.append([])
        self.seen[-1] += idx.tolist()
        self.draws += x.flatten().tolist()
        loss = super().training_step(batch, batch_idx)
        self.losses[-1].append((float(loss), len(y)))
        return loss


for name, data_seed, global_seed in (("a", 5, 0), ("b", 5, 1), ("c", 6, 0)):
    L.seed_everything(global_seed, verbose=False)
    dm = Toy(meta_per_class=5, val_fraction=0.0, batch_size=10, meta_batch_size=10, num_workers=1, seed=data_seed)
    model = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    meta_draws = next(iter(dm.meta_dataloader()))[0].flatten().tolist()
    torch.save({"seen": model.seen, "draws": model.draws, "meta_draws": meta_draws, "losses": model.losses,
                "logged_loss": float(trainer.callback_metrics["train/loss"])},
               f"{out}/{name}_rank{trainer.global_rank}.pt")


# resumed under DDP with a loader worker from the end of epoch 0: the first iterator of the resumed fit draws its
# indices before Lightning's set_epoch, which must not make it replay epoch 0's order
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

for name, ckpt in (("straight", None), ("resumed", f"{out}/ckpt/epoch=0.ckpt")):
    L.seed_everything(0, verbose=False)
    dm = Toy(meta_per_class=5, val_fraction=0.0, batch_size=10, meta_batch_size=10, num_workers=1, seed=5)
    model = Recorder()
    callbacks = [ModelCheckpoint(dirpath=f"{out}/ckpt", filename="{epoch}", save_top_k=-1)] if ckpt is None else []
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=ckpt is None, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    torch.save({"seen": model.seen}, f"{out}/{name}_rank{trainer.global_rank}.pt")
