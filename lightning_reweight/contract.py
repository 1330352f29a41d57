"""The reweighting contract: per-sample losses in, one weighted loss out.

Every method in lightning_reweight turns per-sample losses into per-sample weights. A LightningModule that
wants reweighting computes per-sample losses (``reduction="none"``) and reduces them through
:meth:`ReweightingMixin.reweight`, which multiplies the weights of every attached
:class:`SampleWeighting` source (uniform when none is attached) and takes the mean.

Weights are on the **mean scale**: the loss is ``mean(w_i * l_i)``, so uniform weights are ones. A method
whose weights sum to one (Learning to Reweight) returns ``B * w``; PyTorch's class-weighted mean
``sum(c_y l) / sum(c_y)`` is ``c_y * B / sum(c_y)``. Weights are detached: they are constants for the
backward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_reweight.loggers import step_logs_written

__all__ = [
    "ReweightingMixin",
    "SampleWeighting",
    "WeightingContext",
    "check_per_sample_losses",
    "mean_scale",
    "split_batch",
    "weight_statistics",
]


@dataclass
class WeightingContext:
    """What a weighting source may look at besides the losses.

    Attributes:
        module: the LightningModule being trained (it implements :class:`ReweightingMixin`).
        batch: the training batch as the dataloader yielded it.
        targets: the batch's labels, when known.
        indices: the dataset indices of the batch's samples, when the dataset yields them.
    """

    module: Any
    batch: Any = None
    targets: Tensor | None = None
    indices: Tensor | None = None


@runtime_checkable
class SampleWeighting(Protocol):
    """A source of per-sample weights.

    Implementations return a detached, non-negative tensor of shape ``(B,)`` on the mean scale (see the
    module docstring). They may update their own state (moving averages, meta-networks) when called; they are
    called once per training step, by :meth:`ReweightingMixin.reweight`.
    """

    def sample_weights(self, losses: Tensor, context: WeightingContext) -> Tensor:
        """Return the mean-scale weights for ``losses`` (shape ``(B,)``)."""
        ...


def split_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """Split a batch into ``(inputs, targets, indices)``.

    Batches are tuples ``(inputs, targets)`` or ``(inputs, targets, indices)`` (the latter from
    :class:`lightning_reweight.data.IndexedDataset`).

    Args:
        batch: the batch.

    Returns:
        ``(inputs, targets, indices)``; ``indices`` is ``None`` for two-element batches.

    Raises:
        TypeError: when the batch is neither.

    Example:
        >>> import torch
        >>> x, y, idx = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
        >>> idx is None
        True
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise TypeError(
        "expected a batch (inputs, targets) or (inputs, targets, indices), got "
        f"{type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}; override "
        "per_sample_loss/training_step to unpack other batch layouts"
    )


def check_per_sample_losses(losses: Tensor, batch_size: int | None = None) -> Tensor:
    """Validate that ``losses`` holds one loss per sample.

    Args:
        losses: the tensor to check.
        batch_size: the expected number of samples, if known.

    Returns:
        ``losses`` unchanged.

    Raises:
        ValueError: when ``losses`` is a scalar (already reduced) or not one-dimensional.

    Example:
        >>> import torch
        >>> check_per_sample_losses(torch.ones(4)).shape
        torch.Size([4])
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a Tensor, got {type(losses).__name__}")
    if losses.dim() == 0:
        raise ValueError(
            "losses is a scalar: the loss was already reduced. Reweighting needs per-sample losses; "
            "build the criterion with reduction='none' (e.g. nn.CrossEntropyLoss(reduction='none'))."
        )
    if losses.dim() != 1:
        raise ValueError(f"losses must have shape (batch,), got {tuple(losses.shape)}")
    if batch_size is not None and losses.shape[0] != batch_size:
        raise ValueError(f"losses has {losses.shape[0]} entries but the batch has {batch_size} samples")
    return losses


def weight_statistics(weights: Tensor) -> dict[str, Tensor]:
    """Summary statistics of mean-scale weights.

    ``ess`` is the effective sample size as a fraction of the batch, ``(sum w)^2 / (B * sum w^2)``: 1 for
    uniform weights, ``1/B`` when one sample takes all the weight (0 when all weights are 0).

    Args:
        weights: weights of shape ``(B,)``.

    Returns:
        A dict with ``mean``, ``std``, ``min``, ``max``, ``ess`` and ``zero_frac`` (fraction of zero weights).

    Example:
        >>> import torch
        >>> float(weight_statistics(torch.ones(8))["ess"])
        1.0
    """
    w = weights.detach().float()
    total_sq = (w * w).sum()
    ess = torch.where(total_sq > 0, w.sum() ** 2 / (w.numel() * total_sq), torch.zeros_like(total_sq))
    return {
        "mean": w.mean(),
        "std": w.std(unbiased=False),
        "min": w.min(),
        "max": w.max(),
        "ess": ess,
        "zero_frac": (w == 0).float().mean(),
    }


def _targets_and_indices(batch: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(targets, indices)`` of a batch in one of :func:`split_batch`'s layouts, ``(None, None)`` otherwise.

    A third element is taken for dataset indices only when it is a 1-D integer tensor of the targets' length;
    anything else (file paths, a second input) gives ``None`` indices and a warning.
    """
    if batch is None:
        return None, None
    try:
        _, targets, indices = split_batch(batch)
    except TypeError:
        return None, None
    if indices is not None and not _are_indices(indices, targets):
        warnings.warn(
            "the batch's third element is not a 1-D integer tensor of dataset indices (one per sample), so the "
            "weighting sources get no indices; batches are read as (inputs, targets[, indices]): for another layout "
            "override the module's batch_targets_and_indices(batch)",
            UserWarning,
            stacklevel=4,  # _targets_and_indices < batch_targets_and_indices < reweight < the user's training_step
        )
        indices = None
    return targets, indices


def _are_indices(indices: Any, targets: Any) -> bool:
    return (
        isinstance(indices, Tensor)
        and indices.dim() == 1
        and not indices.is_floating_point()
        and not indices.is_complex()
        and indices.dtype != torch.bool
        and (not isinstance(targets, Tensor) or targets.dim() == 0 or indices.shape[0] == targets.shape[0])
    )


# Names an instance attribute must not take (it would hide the mixin's, or be hidden by it).
_RESERVED = {
    "weightings": "registry of weighting sources (use attach_weighting/detach_weighting)",
    "sample_weights": "method combining the sources' weights",
    "reweight": "method reducing the per-sample losses",
    "attach_weighting": "method attaching a weighting source",
    "detach_weighting": "method detaching a weighting source",
}


class ReweightingMixin:
    """Reduce per-sample losses with the active per-sample weights.

    Mix into a :class:`lightning.LightningModule` (before it in the bases). Implement
    :meth:`per_sample_loss` (meta-gradient methods evaluate it at perturbed parameters) and reduce your training
    losses through :meth:`reweight`. Callbacks and losses attach :class:`SampleWeighting` sources with
    :meth:`attach_weighting`; with none attached, :meth:`reweight` is the plain mean.

    After each call, ``last_sample_weights`` and ``last_sample_indices`` hold the weights used (detached) and
    the batch's dataset indices, for monitors.

    Batches are read as ``(inputs, targets)`` or ``(inputs, targets, indices)``; for another layout (dicts, two
    inputs) override :meth:`batch_targets_and_indices`. The mixin reserves the names ``weightings``,
    ``attach_weighting``, ``detach_weighting``, ``per_sample_loss``, ``sample_weights``,
    ``batch_targets_and_indices``, ``reweight``, ``last_sample_weights``, ``last_sample_indices`` and
    ``weight_log_prefix``: give your own attributes other names.

    Example:
        >>> import torch
        >>> import lightning as L
        >>> from torch import nn
        >>> class Module(ReweightingMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(4, 3)
        ...     def per_sample_loss(self, batch):
        ...         x, y, _ = split_batch(batch)
        ...         return nn.functional.cross_entropy(self.net(x), y, reduction="none")
        ...     def training_step(self, batch, batch_idx):
        ...         return self.reweight(self.per_sample_loss(batch), batch)
        >>> m = Module()
        >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> torch.allclose(m.training_step(batch, 0), m.per_sample_loss(batch).mean())
        True
    """

    #: prefix of the logged weight statistics
    weight_log_prefix: str = "weights"

    # ------------------------------------------------------------------ sources
    @property
    def weightings(self) -> dict[str, SampleWeighting]:
        """The attached weighting sources, by name (in attachment order)."""
        sources = self.__dict__.get("_reweight_sources")
        if sources is None:
            sources = {}
            self.__dict__["_reweight_sources"] = sources
        return sources

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ files modules, parameters and tensors away from the class attributes, so these
        # would shadow the mixin's (or be shadowed by them) without a word
        if name in _RESERVED:
            raise AttributeError(
                f"{type(self).__name__}.{name} is ReweightingMixin's {_RESERVED[name]}; give your attribute another "
                "name"
            )
        super().__setattr__(name, value)

    def attach_weighting(self, name: str, weighting: SampleWeighting) -> None:
        """Attach a weighting source under ``name`` (replacing one of the same name).

        Args:
            name: a key, e.g. the callback's class name.
            weighting: an object with ``sample_weights(losses, context)``.

        Raises:
            TypeError: when ``weighting`` has no ``sample_weights`` method.
        """
        if not isinstance(weighting, SampleWeighting):
            raise TypeError(f"{type(weighting).__name__} does not implement sample_weights(losses, context)")
        self.weightings[name] = weighting

    def detach_weighting(self, name: str) -> None:
        """Remove the weighting source ``name`` if attached."""
        self.weightings.pop(name, None)

    # ------------------------------------------------------------------ losses
    def per_sample_loss(self, batch: Any) -> Tensor:
        """Per-sample training losses of ``batch`` under the current parameters, shape ``(B,)``.

        Meta-gradient methods call this at perturbed parameters (through ``torch.func.functional_call``), so it
        must depend on the parameters only through the module's own forward computation.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample_loss(batch)")

    def batch_targets_and_indices(self, batch: Any) -> tuple[Tensor | None, Tensor | None]:
        """The batch's targets and dataset indices, for the weighting sources (``None`` where unknown).

        The default reads ``(inputs, targets[, indices])`` tuples; a third element that is not a 1-D integer tensor
        of one index per sample is not taken for indices (a warning says so). Override it for other batch layouts,
        e.g. ``return batch["label"], batch["index"]`` for dict batches.

        Args:
            batch: the training batch.

        Returns:
            ``(targets, indices)``.
        """
        return _targets_and_indices(batch)

    def sample_weights(self, losses: Tensor, batch: Any = None) -> Tensor:
        """The product of the attached sources' weights for ``losses`` (ones when none is attached).

        Every source's weights are on the mean scale; their product in general is not (its mean moves with how
        the sources' weights correlate within the batch).

        Args:
            losses: per-sample losses, shape ``(B,)``.
            batch: the training batch (sources may read inputs, targets and indices from it).

        Returns:
            Detached weights, shape ``(B,)``, in at least fp32.
        """
        return self._combined_weights(losses, batch, *self.batch_targets_and_indices(batch))

    def _combined_weights(self, losses: Tensor, batch: Any, targets: Tensor | None, indices: Tensor | None) -> Tensor:
        # against the batch's length only for 1-D targets: with (B, T) targets per-token losses are the user's
        per_sample = isinstance(targets, Tensor) and targets.dim() == 1
        check_per_sample_losses(losses, targets.shape[0] if per_sample and targets is not None else None)
        weights = None
        if self.weightings:
            context = WeightingContext(module=self, batch=batch, targets=targets, indices=indices)
            for source in list(self.weightings.values()):
                w = source.sample_weights(losses, context).detach()
                if w.shape != losses.shape:
                    raise ValueError(
                        f"{type(source).__name__}.sample_weights returned shape {tuple(w.shape)}, "
                        f"expected {tuple(losses.shape)}"
                    )
                weights = w if weights is None else weights * w
        if weights is None:
            return torch.ones_like(losses, dtype=torch.promote_types(losses.dtype, torch.float32))
        return weights

    def reweight(self, losses: Tensor, batch: Any = None, *, log: bool = True) -> Tensor:
        """Reduce per-sample losses to the training loss ``mean(w_i * l_i)``.

        Args:
            losses: per-sample losses, shape ``(B,)`` (``reduction="none"``).
            batch: the training batch, passed to the weighting sources.
            log: log weight statistics (every ``log_every_n_steps`` training steps) when sources are attached.

        Returns:
            The scalar training loss.

        Raises:
            ValueError: when ``losses`` was already reduced to a scalar, or holds another number of losses than
                the batch has targets.
        """
        targets, indices = self.batch_targets_and_indices(batch)
        weights = self._combined_weights(losses, batch, targets, indices)  # validates the losses
        self.last_sample_weights = weights
        self.last_sample_indices = indices
        if log and self.weightings:
            self._log_weight_statistics(weights)
        return (weights.to(losses.dtype) * losses).mean()

    def _log_weight_statistics(self, weights: Tensor) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not hasattr(self, "log_dict") or not trainer.training:
            return  # a reweight call in validation_step must not write to the training weights/* keys
        if not step_logs_written(trainer):
            return
        stats = weight_statistics(weights)
        self.log_dict(  # type: ignore[attr-defined]
            {f"{self.weight_log_prefix}/{k}": v for k, v in stats.items()},
            on_step=True,
            on_epoch=False,
            batch_size=weights.numel(),
        )


def mean_scale(weights: Tensor) -> Tensor:
    """Rescale weights that sum to one (or any positive total) to the mean scale, ``B * w / sum(w)``.

    All-zero weights stay zero (no division by zero); a ``nan`` total gives ``nan`` weights; a subnormal total
    still normalises.

    Example:
        >>> import torch
        >>> mean_scale(torch.tensor([0.25, 0.75]))
        tensor([0.5000, 1.5000])
    """
    total = weights.sum()
    usable = total > 0
    safe = torch.where(usable, total, torch.ones_like(total))
    # B / total overflows for a subnormal total: divide first there (elsewhere the same ops as ever, bit for bit)
    out = torch.where(safe >= torch.finfo(weights.dtype).tiny, weights * (weights.numel() / safe),
                      weights / safe * weights.numel())
    return torch.where(usable, out, torch.where(total.isnan(), total, torch.zeros_like(weights)))

