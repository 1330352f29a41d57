"""The learned weighting function (weight against loss) as a figure, for loggers that take images."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["image_loggers", "log_weight_function"]


def image_loggers(trainer: Any) -> list[Any]:
    """The trainer's loggers that accept figures: TensorBoard (``add_figure``) and W&B (``log_image``)."""
    return [lg for lg in getattr(trainer, "loggers", []) or [] if _kind(lg) is not None]


def _kind(logger: Any) -> str | None:
    names = {cls.__name__ for cls in type(logger).__mro__}  # subclasses of the two loggers count too
    return "tensorboard" if "TensorBoardLogger" in names else "wandb" if "WandbLogger" in names else None


def log_weight_function(trainer: Any, strategy: Any, max_loss: float | None = None, points: int = 200) -> bool:
    """Plot ``V(l)`` for ``l`` in ``[0, max_loss]`` and send it to every image-capable logger.

    Does nothing (returns ``False``) when no logger takes images; matplotlib is imported only when one does.

    Raises:
        ImportError: when a logger takes images and matplotlib is missing.
    """
    loggers = image_loggers(trainer)
    if not loggers:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plotting the weighting function needs matplotlib: pip install "lightning-reweight[plot]"'
        ) from err
    device = next(strategy.parameters()).device
    top = max_loss if max_loss is not None else 3.0 * float(torch.log(torch.tensor(10.0)))
    grid = torch.linspace(0.0, top, points, device=device)
    with torch.no_grad():
        weights = strategy.weight_net(grid).float().cpu()  # V(l) itself, before any normalisation
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(grid.cpu().numpy(), weights.numpy())
    ax.set_xlabel("loss")
    ax.set_ylabel("weight V(loss)")
    ax.set_title(f"weighting function, epoch {trainer.current_epoch}")
    fig.tight_layout()
    step = trainer.global_step
    for logger in loggers:
        if _kind(logger) == "tensorboard":
            logger.experiment.add_figure("meta/weight_function", fig, global_step=step)
        else:
            logger.log_image(key="meta/weight_function", images=[fig], step=step)
    plt.close(fig)
    return True
