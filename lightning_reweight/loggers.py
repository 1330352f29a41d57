"""Rich logging that works with any logger: histograms and figures go to W&B and TensorBoard when present.

Scalars go through ``LightningModule.log`` (every logger gets them). Histograms and figures have no common
Lightning API, so these helpers look for a :class:`~lightning.pytorch.loggers.WandbLogger` or a
:class:`~lightning.pytorch.loggers.TensorBoardLogger` among ``trainer.loggers`` and write to those only. wandb is
never imported unless a W&B logger is attached; only global rank zero writes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["log_figure", "log_histogram", "rich_loggers"]


def rich_loggers(trainer: Any) -> list[tuple[str, Any]]:
    """The attached loggers that take histograms and figures, as ``("wandb" | "tensorboard", logger)`` pairs.

    Example:
        >>> class T:
        ...     loggers = []
        >>> rich_loggers(T())
        []
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    found: list[tuple[str, Any]] = []
    for logger in getattr(trainer, "loggers", []) or []:
        if isinstance(logger, WandbLogger):
            found.append(("wandb", logger))
        elif isinstance(logger, TensorBoardLogger):
            found.append(("tensorboard", logger))
    return found


def _is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def log_histogram(trainer: Any, key: str, values: Tensor, step: int | None = None) -> int:
    """Log a histogram of ``values`` to every W&B and TensorBoard logger of ``trainer`` (rank zero only).

    Args:
        trainer: the Lightning trainer.
        key: the metric name, e.g. ``"memorization/weights_noisy"``.
        values: the samples (any shape; flattened).
        step: the step to log at (default ``trainer.global_step``).

    Returns:
        How many loggers received the histogram.
    """
    if values.numel() == 0 or not _is_global_zero(trainer):
        return 0
    step = int(trainer.global_step) if step is None else step
    data = values.detach().float().flatten().cpu()
    written = 0
    for kind, logger in rich_loggers(trainer):
        if kind == "wandb":
            import wandb

            logger.log_metrics({key: wandb.Histogram(data.numpy())}, step=step)
        else:
            logger.experiment.add_histogram(key, data, global_step=step)
        written += 1
    return written


def log_figure(trainer: Any, key: str, figure: Any, step: int | None = None) -> int:
    """Log a matplotlib figure to every W&B and TensorBoard logger of ``trainer`` (rank zero only).

    Args:
        trainer: the Lightning trainer.
        key: the name of the image.
        figure: a matplotlib ``Figure``.
        step: the step to log at (default ``trainer.global_step``).

    Returns:
        How many loggers received the figure.
    """
    if not _is_global_zero(trainer):
        return 0
    step = int(trainer.global_step) if step is None else step
    written = 0
    for kind, logger in rich_loggers(trainer):
        if kind == "wandb":
            import wandb

            logger.log_metrics({key: wandb.Image(figure)}, step=step)
        else:
            logger.experiment.add_figure(key, figure, global_step=step, close=False)
        written += 1
    return written
