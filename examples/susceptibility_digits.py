"""Watch a network memorise noisy labels, live in W&B, without clean labels.

Trains plain cross-entropy on the embedded digits data with 60% symmetric label noise and a
``SusceptibilityMonitor``. The run is an *offline* W&B run by default (no account or network needed); its
``memorization/`` panel holds the susceptibility ``zeta``, the per-epoch drop, the train accuracy on the noisy and
the clean subsets (the datamodule knows which samples are noisy), and a figure of all three over the epochs.

    python examples/susceptibility_digits.py                      # offline run under ./wandb_runs
    python examples/susceptibility_digits.py --wandb-dir /tmp/wb  # elsewhere
    wandb sync ./wandb_runs/wandb/offline-run-*                   # upload later, if you like

Finishes in well under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("WANDB_MODE", "offline")

SUBSETS = ("noisy", "clean")


def main() -> None:
    parser = argparse.ArgumentParser(description="SusceptibilityMonitor on noisy digits (offline W&B run)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--noise-rate", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wandb-dir", default="./wandb_runs", help="where the offline W&B run is written")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")

    import lightning as L
    from lightning.pytorch.loggers import WandbLogger

    from lightning_reweight import ReweightClassifier
    from lightning_reweight.callbacks import SusceptibilityMonitor
    from lightning_reweight.data import DigitsDataModule
    from lightning_reweight.loggers import define_epoch_axis, epoch_end_step, log_figure
    from lightning_reweight.models import MLP

    L.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(noise_rate=args.noise_rate, seed=args.seed)
    model = ReweightClassifier(MLP(64, 10, hidden=(256, 256)), num_classes=10, lr=0.05)
    os.makedirs(args.wandb_dir, exist_ok=True)
    logger = WandbLogger(project="lightning-reweight-examples", save_dir=args.wandb_dir, offline=True)
    monitor = SusceptibilityMonitor()  # batch of 128 random-labelled inputs, every epoch
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=dm)

    history = monitor.logged_history
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["memorization/zeta"] for r in history], color="tab:red", label="zeta")
        ax.set_xlabel("epoch")
        ax.set_ylabel("zeta")
        ax2 = ax.twinx()
        for subset in SUBSETS:  # without noise (--noise-rate 0) there is no noisy subset
            key = f"memorization/train_acc_{subset}"
            if all(key in r for r in history):
                ax2.plot(epochs, [r[key] for r in history], label=f"train acc ({subset} subset)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("train accuracy")
        fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.2), fontsize=8)
        fig.tight_layout()
        # at the last epoch's step, on the epoch axis of the other memorization/ charts
        define_epoch_axis(trainer, "memorization/curves")
        log_figure(trainer, "memorization/curves", fig, step=epoch_end_step(trainer), epoch=history[-1]["epoch"])
    except ImportError:
        print('matplotlib is missing (pip install "lightning-reweight[plot]"): no figure logged')

    import wandb

    run_dir = logger.experiment.dir if hasattr(logger.experiment, "dir") else args.wandb_dir
    wandb.finish()
    last = history[-1]
    subsets = [f"train acc {subset} subset {last[f'memorization/train_acc_{subset}']:.3f}" for subset in SUBSETS
               if f"memorization/train_acc_{subset}" in last]
    print(", ".join([f"epoch {last['epoch']}: zeta {last['memorization/zeta']:.4f}", *subsets]))
    print(f"offline W&B run written under {os.path.dirname(run_dir)}")


if __name__ == "__main__":
    main()
