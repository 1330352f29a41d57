"""ABSGD on the digits data: negative lam against 60% symmetric label noise (or positive lam on long-tailed data).

Run::

    python examples/absgd_digits.py                       # 60% symmetric noise, lam = -1 after 6 ERM epochs
    python examples/absgd_digits.py --imbalance 50 --lam 1 --start-epoch 12

Trains plain cross-entropy and ABSGD with the same recipe and prints their test accuracies (well under a minute
on a laptop CPU).
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_reweight import ReweightClassifier
from lightning_reweight.bench.runner import quiet
from lightning_reweight.callbacks import DROSchedule
from lightning_reweight.data import DigitsDataModule
from lightning_reweight.losses import AttentionalDROLoss
from lightning_reweight.models import MLP


def train(dm: DigitsDataModule, lam: float | None, start_epoch: int, epochs: int, seed: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    callbacks = []
    criterion = None
    if lam is not None:
        # ERM (lam=None) until start_epoch, then the attentional DRO loss with this lam
        criterion = AttentionalDROLoss(lam=None, gamma=0.9, alpha=1.0)
        callbacks.append(DROSchedule(start_epoch=start_epoch, lam=lam))
    model = ReweightClassifier(MLP(64, dm.num_classes, hidden=(256, 256)), dm.num_classes, criterion=criterion, lr=0.05)
    with quiet():  # silence Lightning's informational messages
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm)
        (result,) = trainer.test(model, datamodule=dm, verbose=False)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, default=0.6, help="symmetric label-noise rate (balanced data only)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="long-tail imbalance ratio (1: balanced; above 1 the labels are clean and --noise is ignored)")
    p.add_argument("--lam", type=float, default=-1.0, help="DRO temperature (< 0: label noise, > 0: imbalance)")
    p.add_argument("--start-epoch", type=int, default=6, help="ERM epochs before ABSGD starts")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    noise = args.noise if args.imbalance == 1.0 else 0.0
    if noise != args.noise:
        print(f"--imbalance {args.imbalance}: long-tailed scenario with clean labels (--noise {args.noise} ignored)")
    dm = DigitsDataModule(noise_rate=noise, imbalance_ratio=args.imbalance, seed=args.seed)
    dm.setup("fit")
    for name, lam in (("cross-entropy", None), (f"ABSGD lam={args.lam}", args.lam)):
        r = train(dm, lam, args.start_epoch, args.epochs, args.seed)
        print(f"{name:>20}: test acc {100 * r['test/acc']:.1f}%  balanced acc {100 * r['test/balanced_acc']:.1f}%")


if __name__ == "__main__":
    main()
