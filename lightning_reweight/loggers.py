"""Rich logging that works with any logger: histograms and figures go to W&B and TensorBoard when present.

Scalars go through ``LightningModule.log`` (every logger gets them). Histograms and figures have no common
Lightning API, so these helpers look for a :class:`~lightning.pytorch.loggers.WandbLogger` or a
:class:`~lightning.pytorch.loggers.TensorBoardLogger` among ``trainer.loggers`` and write to those only. wandb is
never imported unless a W&B logger is attached; only global rank zero writes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "define_epoch_axis",
    "epoch_end_step",
    "log_figure",
    "log_histograms",
    "log_step",
    "publish_metrics",
    "rich_loggers",
    "step_logs_written",
]


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


def step_logs_written(trainer: Any) -> bool:
    """Whether Lightning writes this training step's ``on_step`` logs to the loggers.

    Lightning keeps only the latest ``on_step`` value of a key and writes it when
    ``(optimizer steps taken + 1) % log_every_n_steps == 0`` (or when training stops). Computing a statistic
    only on those steps gives the loggers exactly what computing it every step would, at a fraction of the cost.

    Args:
        trainer: the running Trainer (or an object with ``log_every_n_steps`` and ``global_step``).

    Returns:
        ``True`` on the steps whose logs are written; ``False`` when ``log_every_n_steps`` is 0.

    Example:
        >>> class T:
        ...     log_every_n_steps = 5
        ...     global_step = 4
        >>> step_logs_written(T())
        True
    """
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None:
        try:
            return bool(connector.should_update_logs or getattr(trainer, "fast_dev_run", False))
        except (AttributeError, NotImplementedError):  # pragma: no cover - outside a Lightning loop
            pass
    every = int(getattr(trainer, "log_every_n_steps", 50) or 0)
    if every <= 0:
        return False
    return (int(getattr(trainer, "global_step", 0)) + 1) % every == 0


def _is_global_zero(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_global_zero", True))


def _callback_metrics(trainer: Any) -> dict[str, Tensor]:
    """The dict behind ``trainer.callback_metrics``, without the property's refresh from the logged results.

    The public property folds every ``self.log``-ged value into the dict on each access (a visible share of a
    monitor's per-epoch cost on a small model); the values published here are not among those, so the stored dict
    is updated directly. Falls back to the property if Lightning stores it elsewhere.
    """
    stored = getattr(getattr(trainer, "_logger_connector", None), "_callback_metrics", None)
    return stored if isinstance(stored, dict) else trainer.callback_metrics


def publish_metrics(trainer: Any, values: dict[str, float], *, epoch: int, step: int) -> None:
    """Put values that are already identical on every rank into ``trainer.callback_metrics`` and every logger.

    They bypass ``LightningModule.log`` (whose per-call bookkeeping costs about a millisecond per key, and which
    only logs into the running epoch): callbacks use this for values they reduced themselves, and for values of an
    epoch that has already ended (one closed by a checkpoint resume). Loggers write on rank zero only, with
    ``epoch`` beside the values (as Lightning adds it); ``ModelCheckpoint``/``EarlyStopping`` can monitor them.

    Args:
        trainer: the Lightning trainer.
        values: metric name -> value.
        epoch: the epoch the values belong to.
        step: the step to log them at (:func:`log_step`, or :func:`epoch_end_step` for epoch-end values).

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> import lightning as L, tempfile
        >>> trainer = L.Trainer(logger=CSVLogger(tempfile.mkdtemp()), enable_progress_bar=False)
        >>> publish_metrics(trainer, {"memorization/zeta": 0.25}, epoch=0, step=0)
        >>> float(trainer.callback_metrics["memorization/zeta"])
        0.25
    """
    if not values:
        return
    _callback_metrics(trainer).update({k: torch.tensor(v) for k, v in values.items()})
    if _is_global_zero(trainer):
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics({**values, "epoch": epoch}, step=step)


def log_histograms(
    trainer: Any, values: dict[str, Tensor], step: int | None = None, epoch: int | None = None
) -> int:
    """Log histograms to every W&B and TensorBoard logger of ``trainer`` (rank zero only; one W&B step).

    Args:
        trainer: the Lightning trainer.
        values: metric name -> samples (any shape; flattened). Non-finite samples (a diverged run) are left out
            with a warning, since a histogram has no bin for them; tensors left empty are skipped.
        step: the step to log at (default :func:`log_step`, Lightning's own).
        epoch: written as ``epoch`` in the W&B row too (for keys plotted against the epoch,
            :func:`define_epoch_axis`).

    Returns:
        How many loggers received the histograms.
    """
    if not _is_global_zero(trainer):
        return 0
    data = {}
    for key, value in values.items():
        samples = value.detach().flatten().cpu().double()  # float64: large float64 samples stay finite
        finite = torch.isfinite(samples)
        if not bool(finite.all()):
            warnings.warn(f"histogram {key!r}: non-finite values (nan/inf) are left out of it", stacklevel=2)
            samples = samples[finite]
        if samples.numel() > 0:
            data[key] = samples
    if not data:
        return 0
    step = log_step(trainer) if step is None else step
    written = 0
    for kind, logger in rich_loggers(trainer):
        if kind == "wandb":
            import wandb

            # wandb annotates `sequence` as Sequence; it passes it to np.histogram, which takes an array
            hists: dict[str, Any] = {k: wandb.Histogram(v.numpy()) for k, v in data.items()}  # type: ignore[arg-type]
            logger.log_metrics(hists if epoch is None else {**hists, "epoch": epoch}, step=step)
        else:
            for k, v in data.items():
                logger.experiment.add_histogram(k, v, global_step=step)
        written += 1
    return written


def log_step(trainer: Any) -> int:
    """The step Lightning's own ``self.log`` values are written at: batches that stepped an optimizer.

    It equals ``trainer.global_step`` with one optimizer; with several (manual optimization) ``global_step``
    counts every optimizer's steps, and values logged at it would sit apart from Lightning's on the step axis.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return int(stepped) if isinstance(stepped, int) else int(getattr(trainer, "global_step", 0))


def epoch_end_step(trainer: Any) -> int:
    """The step Lightning writes its epoch-end values at (``self.log(..., on_epoch=True)``, validation).

    That is the epoch's last batch: one below :func:`log_step` once the epoch's batches are done.

    Example:
        >>> class T:
        ...     global_step = 11  # after an epoch of 11 batches
        >>> epoch_end_step(T())
        10
    """
    return max(log_step(trainer) - 1, 0)


def define_epoch_axis(trainer: Any, keys: str | Sequence[str]) -> None:
    """Make W&B plot the metrics ``keys`` (exact names, e.g. ``"memorization/zeta"``) against ``epoch``.

    Exact names, not a pattern: ``WandbLogger`` defines ``*`` against ``trainer/global_step``, and W&B ties a new
    key to whichever matching pattern it checks first, so ``"memorization/*"`` won for only some keys, at random; an
    exact name takes precedence. A no-op without a W&B logger or off rank zero. A logger's ``prefix``
    (``WandbLogger(prefix="run1")`` writes ``run1-epoch``, ``run1-memorization/zeta``) is applied to every name.
    Values logged on this axis need ``epoch`` in their row (:func:`publish_metrics`, and the ``epoch`` argument of
    :func:`log_histograms` and :func:`log_figure`).
    """
    if not _is_global_zero(trainer):
        return
    names = [keys] if isinstance(keys, str) else list(keys)
    for kind, logger in rich_loggers(trainer):
        if kind == "wandb":
            experiment = logger.experiment
            if hasattr(experiment, "define_metric"):
                prefix = getattr(logger, "_prefix", "") or ""
                join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
                epoch = f"{prefix}{join}epoch" if prefix else "epoch"
                experiment.define_metric(epoch)
                for name in names:
                    experiment.define_metric(f"{prefix}{join}{name}" if prefix else name, step_metric=epoch)


def log_figure(trainer: Any, key: str, figure: Any, step: int | None = None, epoch: int | None = None) -> int:
    """Log a matplotlib figure to every W&B and TensorBoard logger of ``trainer`` (rank zero only).

    Args:
        trainer: the Lightning trainer.
        key: the name of the image.
        figure: a matplotlib ``Figure``.
        step: the step to log at (default :func:`log_step`, Lightning's own).
        epoch: written as ``epoch`` in the W&B row too (for keys plotted against the epoch,
            :func:`define_epoch_axis`).

    Returns:
        How many loggers received the figure.
    """
    if not _is_global_zero(trainer):
        return 0
    step = log_step(trainer) if step is None else step
    written = 0
    for kind, logger in rich_loggers(trainer):
        if kind == "wandb":
            import wandb

            row: dict[str, Any] = {key: wandb.Image(figure)}
            logger.log_metrics(row if epoch is None else {**row, "epoch": epoch}, step=step)
        else:
            logger.experiment.add_figure(key, figure, global_step=step, close=False)
        written += 1
    return written
