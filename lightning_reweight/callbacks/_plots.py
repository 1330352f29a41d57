"""The learned weighting function (weight against loss) as a figure, for loggers that take images."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_reweight.loggers import epoch_end_step, log_figure, rich_loggers

__all__ = ["log_weight_function"]


def log_weight_function(
    trainer: Any,
    strategy: Any,
    max_loss: float | None = None,
    points: int = 200,
    epoch: int | None = None,
    step: int | None = None,
) -> bool:
    """Plot ``V(l)`` for ``l`` in ``[0, max_loss]`` and send it to every W&B / TensorBoard logger.

    Called at an epoch's end, it logs at the step Lightning writes its epoch-end values at (or at ``step``).
    ``epoch`` (default the trainer's current epoch) goes into the title.

    Does nothing (returns ``False``) when no logger takes images; matplotlib is imported only when one does.
    Without matplotlib it warns once and returns ``False``: a missing plotting package must not end a training
    run at an epoch's end.
    """
    if not rich_loggers(trainer):
        return False
    try:
        from matplotlib.figure import Figure  # no pyplot: the user's backend and figure list stay as they are
    except ImportError:
        rank_zero_warn(
            'the weighting-function figure (meta/weight_function) needs matplotlib: pip install '
            '"lightning-reweight[plot]"; training goes on without it'
        )
        return False
    device = next(strategy.parameters()).device
    top = max_loss if max_loss is not None else 3.0 * float(torch.log(torch.tensor(10.0)))
    grid = torch.linspace(0.0, top, points, device=device)
    with torch.no_grad():
        weights = strategy.weight_net(grid).float().cpu()  # V(l) itself, before any normalisation
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.plot(grid.cpu().numpy(), weights.numpy())
    ax.set_xlabel("loss")
    ax.set_ylabel("weight V(loss)")
    ax.set_title(f"weighting function, epoch {trainer.current_epoch if epoch is None else epoch}")
    fig.tight_layout()
    return log_figure(trainer, "meta/weight_function", fig, step=epoch_end_step(trainer) if step is None else step) > 0
