"""Run by tests/test_meta_callbacks.py: 2-process DDP (gloo) fits with MW-Net (paper order, then delayed) and L2RW;
each rank saves state."""

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


class Weights(L.Callback):
    """Each rank's weights as handed to ``reweight``, with the batch's dataset indices."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((pl_module.last_sample_weights.detach().clone(), batch[2].clone()))


class Masked(L.LightningDataModule):
    """The training loader with a noise mask (every third sample): MetaReweight then syncs its weight AUROC."""

    def __init__(self, train) -> None:
        super().__init__()
        self.train = train
        self.noise_mask = torch.arange(len(train.dataset)) % 3 == 0

    def train_dataloader(self):
        return self.train


runs = (("mwn", MetaWeightNet(hidden=8)), ("mwn_delayed", MetaWeightNet(hidden=8, delayed=True)), ("l2rw", L2RW()))
for name, strategy in runs:
    train, meta = loaders()
    recorder = Weights()
    model = module()
    cb = MetaReweight(strategy, meta_dataloader=meta, hypergrad="finite_diff")
    init = flat(strategy).clone() if name.startswith("mwn") else torch.zeros(0)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb, recorder],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Masked(train)) if name == "l2rw" else trainer.fit(model, train)
    scores = cb.sample_scores()  # a collective: summed over both ranks
    torch.save({"meta": flat(strategy).clone() if name.startswith("mwn") else torch.zeros(0), "init": init,
                "model": flat(model).clone(), "steps": cb.state_dict()["meta_steps"],
                "weights": model.last_sample_weights.clone(), "sample_scores": scores, "auroc": cb.auroc_history,
                "local_weights": torch.cat([w for w, _ in recorder.seen]),
                "local_indices": torch.cat([i for _, i in recorder.seen])},
               f"{out}/{name}_rank{trainer.global_rank}.pt")

# one MW-Net step with an SGD meta optimizer (the gradient's scale matters, unlike Adam's first step): each rank
# records what it trained on, so the test can recompute the two local meta gradients and their mean
L.seed_everything(0, verbose=False)
train, meta = loaders()
model = module()
strategy = MetaWeightNet(hidden=8, meta_optimizer="sgd", meta_lr=0.5)
cb = MetaReweight(strategy, meta_dataloader=meta, hypergrad="forward")
seen = {"meta_init": {k: v.clone() for k, v in strategy.weight_net.state_dict().items()}}


class Record(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen.update(model_init={k: v.clone() for k, v in pl_module.state_dict().items()},
                    batch=[t.clone() for t in batch])


draw = cb._next_meta_batch
cb._next_meta_batch = lambda t: seen.setdefault("meta_batch", [x.clone() for x in draw(t)])
trainer = L.Trainer(max_epochs=1, max_steps=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=[Record(), cb],
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
trainer.fit(model, train)
seen["meta_after"] = {k: v.clone() for k, v in strategy.weight_net.state_dict().items()}
torch.save(seen, f"{out}/mwn_sgd_step_rank{trainer.global_rank}.pt")

class RecordL2RW(L.Callback):
    """The rank's model before its first step, the batch, and the weights it got."""

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.update(model_init={k: v.clone() for k, v in pl_module.state_dict().items()},
                         batch=[t.clone() for t in batch])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen["weights"] = pl_module.last_sample_weights.detach().clone()


# one L2RW step per fast route: each rank records its batch, meta batch and weights, so the test can check that
# the alignment used the meta gradient averaged over the ranks' meta batches
for hypergrad in ("forward", "finite_diff"):
    L.seed_everything(0, verbose=False)
    train, meta = loaders()
    model = module()
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad=hypergrad)
    seen = {}
    draw = cb._next_meta_batch
    cb._next_meta_batch = lambda t, draw=draw, seen=seen: seen.setdefault("meta_batch", [x.clone() for x in draw(t)])
    trainer = L.Trainer(max_epochs=1, max_steps=1, accelerator="cpu", devices=2, strategy="ddp",
                        callbacks=[RecordL2RW(seen), cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, train)
    torch.save(seen, f"{out}/l2rw_{hypergrad}_step_rank{trainer.global_rank}.pt")

# resumed under DDP: a meta loader with its own generator (as the datamodule's), 3 meta batches per meta epoch;
# each rank must resume its own meta order (the checkpoint used to hold rank 0's generator only), and the sample
# history must hold both ranks' visits once (rank 0's sums were loaded on both ranks)
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

# Resumed from epoch 0's or epoch 1's last batch (3 steps per rank and epoch): that epoch's end values come from the
# checkpoint's records, which held rank 0's alone (the weight AUROC and the monitor's subset accuracies and weight
# means were rank 0's samples' on both ranks)
from lightning_reweight.callbacks import SusceptibilityMonitor  # noqa: E402

runs = (("straight", None), ("resumed", f"{out}/ckpt/epoch=0.ckpt"), ("lastbatch", f"{out}/ckpt/epoch=0-step=3.ckpt"),
        ("lastbatch1", f"{out}/ckpt/epoch=1-step=6.ckpt"))
for name, ckpt in runs:
    L.seed_everything(0, verbose=False)
    train, meta = loaders()
    meta = DataLoader(meta.dataset, batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(7))
    model = module()
    # a warm-up epoch: closing it from its last batch must not add an AUROC (under DDP one is computed whatever the
    # rank holds, so the epoch closed, not the trainer's, decides)
    cb = MetaReweight(L2RW(), meta_dataloader=meta, hypergrad="finite_diff", warmup_epochs=1)
    monitor = SusceptibilityMonitor(num_classes=4, batch_size=32, pool_size=64)
    saving = [ModelCheckpoint(dirpath=f"{out}/ckpt", filename="{epoch}", save_top_k=-1),
              ModelCheckpoint(dirpath=f"{out}/ckpt", filename="{epoch}-{step}", save_top_k=-1, every_n_train_steps=3)]
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp",
                        callbacks=[cb, monitor] + (saving if ckpt is None else []), logger=False,
                        enable_checkpointing=ckpt is None, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Masked(train), ckpt_path=ckpt)
    if ckpt is None:  # Lightning's way to save after the fit, on every rank: the ranks' states are gathered too
        trainer.save_checkpoint(f"{out}/postfit.ckpt")
    scores = cb.sample_scores()
    torch.save({"model": flat(model).clone(), "visits": scores["visits"], "percentile": scores["percentile"],
                "auroc": cb.auroc_history, "sample_auroc": cb.sample_auroc_history,
                "monitor": monitor.logged_history},
               f"{out}/{name}_rank{trainer.global_rank}.pt")
