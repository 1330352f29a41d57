"""Model selection without clean labels: the train-accuracy / susceptibility quadrant rule.

Forouzesh, Sedghi & Thiran (ICLR 2023) split a set of models (runs or checkpoints) at the mean train accuracy and
the mean susceptibility ``zeta`` and prefer the quadrant with high train accuracy and low ``zeta``: those models fit
the training set without being able to fit random labels quickly, so they fit the clean part of it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

__all__ = ["QUADRANTS", "ModelSelection", "plot_model_selection", "select_models", "susceptibility_from_checkpoint"]

#: The four quadrants; the first is the preferred one.
QUADRANTS: tuple[str, ...] = (
    "high_acc_low_zeta",
    "high_acc_high_zeta",
    "low_acc_low_zeta",
    "low_acc_high_zeta",
)


@dataclass(frozen=True)
class ModelSelection:
    """The result of :func:`select_models`.

    Attributes:
        names: the models' names, in input order.
        train_accuracy: their train accuracies.
        susceptibility: their susceptibilities ``zeta``.
        accuracy_threshold: the mean train accuracy.
        susceptibility_threshold: the mean ``zeta``.
        quadrants: each model's quadrant (one of :data:`~lightning_reweight.metrics.selection.QUADRANTS`).
        preferred: names of the models in the preferred quadrant (high accuracy, low ``zeta``), best train
            accuracy first.

    Example:
        >>> sel = select_models([0.9, 0.5], [0.1, 0.5], names=["a", "b"])
        >>> sel.accuracy_threshold, sel.quadrants
        (0.7, ('high_acc_low_zeta', 'low_acc_high_zeta'))
        >>> sel.as_dict()["models"][0]["quadrant"]
        'high_acc_low_zeta'
    """

    names: tuple[str, ...]
    train_accuracy: tuple[float, ...]
    susceptibility: tuple[float, ...]
    accuracy_threshold: float
    susceptibility_threshold: float
    quadrants: tuple[str, ...]
    preferred: tuple[str, ...]

    def quadrant_of(self, name: str) -> str:
        """The quadrant of the model ``name``."""
        return self.quadrants[self.names.index(name)]

    def as_dict(self) -> dict[str, Any]:
        """Plain-Python form (for JSON)."""
        return {
            "accuracy_threshold": self.accuracy_threshold,
            "susceptibility_threshold": self.susceptibility_threshold,
            "preferred": list(self.preferred),
            "models": [
                {"name": n, "train_accuracy": a, "susceptibility": z, "quadrant": q}
                for n, a, z, q in zip(self.names, self.train_accuracy, self.susceptibility, self.quadrants)
            ],
        }


def select_models(
    train_accuracy: Sequence[float],
    susceptibility: Sequence[float],
    names: Sequence[str] | None = None,
) -> ModelSelection:
    """Place each model in a quadrant split at the mean train accuracy and the mean susceptibility.

    A model is "high accuracy" when its train accuracy is at least the mean, and "low zeta" when its
    susceptibility is below the mean. A model *at* a mean counts as high accuracy and as high ``zeta``; "at" allows
    the rounding of the inputs (a few units in the last place of the largest value), so that the middle of
    ``[0.3, 0.6, 0.9]`` is at the mean although its binary float is not exactly the binary floats' mean. The preferred
    models are those with high train accuracy and low ``zeta``. That quadrant can be empty: whenever accuracy and
    ``zeta`` rise together across the models (as they often do over the checkpoints of one run), or all ``zeta``
    are equal. The preferred set is then empty; the rule gives no pick, and the high-accuracy model with the lowest
    ``zeta`` is the nearest to its intent.

    Args:
        train_accuracy: one train accuracy per model (on the training labels as given, noisy or not).
        susceptibility: one ``zeta`` per model (e.g. the final ``memorization/zeta`` of each run).
        names: the models' names (default ``"0"``, ``"1"``, ...).

    Returns:
        A :class:`ModelSelection`.

    Raises:
        ValueError: when the sequences are empty, their lengths differ, or a value is not finite.
        TypeError: when a mapping is given (its keys would be read as the values): pass ``list(d.values())`` and
            ``names=list(d)``.

    Example:
        >>> sel = select_models([0.9, 0.95, 0.5, 0.6], [0.1, 0.8, 0.2, 0.9], names=["a", "b", "c", "d"])
        >>> sel.preferred, sel.quadrant_of("b")
        (('a',), 'high_acc_high_zeta')
    """
    for what, values in (("train_accuracy", train_accuracy), ("susceptibility", susceptibility)):
        if isinstance(values, Mapping):
            raise TypeError(
                f"{what} is a mapping; pass its values in order and its keys as names: "
                "select_models(list(acc.values()), [zeta[k] for k in acc], names=list(acc))"
            )
    acc = [float(a) for a in train_accuracy]
    zeta = [float(z) for z in susceptibility]
    if not acc:
        raise ValueError("select_models needs at least one model (train_accuracy is empty)")
    if len(acc) != len(zeta):
        raise ValueError(f"train_accuracy has {len(acc)} entries but susceptibility has {len(zeta)}")
    labels = [str(i) for i in range(len(acc))] if names is None else [str(n) for n in names]
    if len(labels) != len(acc):
        raise ValueError(f"names has {len(labels)} entries but there are {len(acc)} models")
    if len(set(labels)) != len(labels):
        raise ValueError("names must be unique")
    for what, values in (("train_accuracy", acc), ("susceptibility", zeta)):
        bad = [labels[i] for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(
                f"{what} is not finite for model(s) {bad} (a diverged run?); the mean thresholds would be nan "
                "and every model misplaced: leave those models out"
            )
    acc_t = math.fsum(acc) / len(acc)  # the reported thresholds (rounded means)
    zeta_t = math.fsum(zeta) / len(zeta)
    above_acc, below_zeta = _versus_mean(acc), _versus_mean(zeta)
    quadrants = []
    for a, z in zip(above_acc, below_zeta):
        high = a >= 0
        low = z < 0
        quadrants.append(
            ("high_acc" if high else "low_acc") + ("_low_zeta" if low else "_high_zeta")
        )
    preferred = sorted(
        (i for i, q in enumerate(quadrants) if q == QUADRANTS[0]), key=lambda i: (-acc[i], zeta[i])
    )
    return ModelSelection(
        names=tuple(labels),
        train_accuracy=tuple(acc),
        susceptibility=tuple(zeta),
        accuracy_threshold=acc_t,
        susceptibility_threshold=zeta_t,
        quadrants=tuple(quadrants),
        preferred=tuple(labels[i] for i in preferred),
    )


def _versus_mean(values: list[float]) -> list[int]:
    """``+1`` / ``0`` / ``-1``: each value above, at or below the mean, "at" allowing the inputs' rounding.

    Compared in rationals (``v * n`` against the exact sum; a rounded mean can land above a value exactly at it),
    with a tolerance of ``4 n`` units of roundoff of the largest magnitude: decimal inputs such as 0.3, 0.6, 0.9
    are each off their decimal by up to half a unit in the last place, so ``n * 0.6`` and their sum differ by a
    few such units.
    """
    n = len(values)
    total = sum(map(Fraction, values))
    tol = Fraction(4 * n * sys.float_info.epsilon) * max(Fraction(abs(v)) for v in values)
    out = []
    for v in values:
        gap = Fraction(v) * n - total
        out.append(0 if abs(gap) <= tol else (1 if gap > 0 else -1))
    return out


def susceptibility_from_checkpoint(checkpoint: str | Path | dict[str, Any], prefix: str = "memorization") -> float:
    """The ``zeta`` a :class:`~lightning_reweight.callbacks.SusceptibilityMonitor` had reached in a checkpoint.

    Args:
        checkpoint: a Lightning checkpoint path (loaded with ``weights_only=True``) or its loaded dict.
        prefix: the monitor's ``prefix`` (it is part of the callback's state key).

    Returns:
        The running mean of the drops measured up to that checkpoint.

    Raises:
        KeyError: when the checkpoint holds no monitor state with measurements.

    Example:
        >>> ckpt = {"callbacks": {"SusceptibilityMonitor{'prefix': 'memorization'}": {"drops": [0.1, 0.3]}}}
        >>> round(susceptibility_from_checkpoint(ckpt), 6)
        0.2
    """
    if not isinstance(checkpoint, dict):
        import torch

        checkpoint = cast(dict[str, Any], torch.load(checkpoint, map_location="cpu", weights_only=True))
    for key, state in checkpoint.get("callbacks", {}).items():
        # the monitor's state key is "<class name>{'prefix': '...'}": a subclass has its own class name
        if f"{{'prefix': '{prefix}'}}" in key and isinstance(state, dict) and state.get("drops"):
            drops = [float(d) for d in state["drops"]]
            return sum(drops) / len(drops)
    raise KeyError(f"no SusceptibilityMonitor state with prefix {prefix!r} and measurements in this checkpoint")


def plot_model_selection(selection: ModelSelection, ax: Any = None, *, annotate: bool = True) -> Any:
    """Scatter ``zeta`` against train accuracy with the two thresholds and the preferred quadrant shaded.

    Args:
        selection: the result of :func:`select_models`.
        ax: a matplotlib ``Axes`` to draw on (default: a new figure).
        annotate: write each model's name next to its point.

    Returns:
        The matplotlib ``Figure`` (built without pyplot, so it is not in pyplot's figure list: save it with
        ``fig.savefig(path)``, or log it with a logger that takes figures).

    Raises:
        ImportError: when matplotlib is not installed (``pip install "lightning-reweight[plot]"``).

    Example:
        >>> sel = select_models([0.9, 0.95, 0.5, 0.6], [0.1, 0.8, 0.2, 0.9], names=["a", "b", "c", "d"])
        >>> fig = plot_model_selection(sel)
        >>> fig.axes[0].get_xlabel()
        'susceptibility zeta'
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure list, the user's backend untouched
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'plot_model_selection needs matplotlib: pip install "lightning-reweight[plot]"'
        ) from err
    user_axes = ax is not None
    if ax is None:
        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    autoscale = (ax.get_autoscalex_on(), ax.get_autoscaley_on())
    colours = {
        QUADRANTS[0]: "tab:green",
        QUADRANTS[1]: "tab:orange",
        QUADRANTS[2]: "tab:blue",
        QUADRANTS[3]: "tab:red",
    }
    for q in QUADRANTS:
        idx = [i for i, qq in enumerate(selection.quadrants) if qq == q]
        if idx:
            ax.scatter(
                [selection.susceptibility[i] for i in idx],
                [selection.train_accuracy[i] for i in idx],
                c=colours[q],
                label=q.replace("_", " "),
            )
    ax.axvline(selection.susceptibility_threshold, color="grey", linestyle="--", linewidth=1)
    ax.axhline(selection.accuracy_threshold, color="grey", linestyle="--", linewidth=1)
    x_lo, _ = ax.set_xlim(ax.get_xlim())  # frozen: the shading must not widen the axes past its own edges
    _, y_hi = ax.set_ylim(ax.get_ylim())
    ax.fill_between(
        [x_lo, selection.susceptibility_threshold],
        selection.accuracy_threshold,
        y_hi,
        color="tab:green",
        alpha=0.08,
    )
    if annotate:
        for n, z, a in zip(selection.names, selection.susceptibility, selection.train_accuracy):
            ax.annotate(n, (z, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("susceptibility zeta")
    ax.set_ylabel("train accuracy")
    ax.set_title("model selection: prefer high accuracy, low zeta")
    ax.legend(fontsize=8)
    if user_axes:  # freezing the limits above must not outlive this call on a user's axes
        ax.set_autoscalex_on(autoscale[0])
        ax.set_autoscaley_on(autoscale[1])
    return fig
