"""Losses built from the training class counts, which may be given later (private).

A config file cannot name the datamodule's counts: they exist only once the data is set up. A count-based loss
constructed with ``cls_num_list=None`` waits for them: :class:`~lightning_reweight.classifier.ReweightClassifier`
fills them in from ``trainer.datamodule.train_class_counts`` in its ``setup`` (and
:class:`~lightning_reweight.callbacks.DeferredReweighting` from its own counts), or the user calls
:meth:`ClassCountLoss.set_class_counts`. Loading a state dict into a loss still waiting for its counts takes the
buffers' values from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_reweight.functional.longtail import check_class_counts
from lightning_reweight.losses._fp32 import Float32Buffers


class ClassCountLoss(Float32Buffers):
    """A loss whose buffers (margins, offsets, class weights) are computed from per-class training counts.

    Subclasses name their count-derived buffers in ``count_buffers`` and build them in :meth:`_count_buffers`.
    """

    #: names of the buffers computed from the counts
    count_buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        #: the class counts the buffers were built from (``None`` until they are known; non-integer values, e.g.
        #: priors, are kept as given)
        self.cls_num_list: tuple[float, ...] | None = None
        #: built without counts: they come from the training data (``ReweightClassifier`` refreshes them every fit)
        self.counts_from_data = True
        for name in self.count_buffers:
            self.register_buffer(name, None)

    def _count_buffers(self, counts: Tensor) -> dict[str, Tensor]:
        """The buffers for validated float64 ``counts`` (shape ``(C,)``)."""
        raise NotImplementedError

    @property
    def has_class_counts(self) -> bool:
        """Whether the count-derived buffers exist (from counts, or loaded from a state dict)."""
        return all(self._buffers.get(name) is not None for name in self.count_buffers)

    def _init_counts(self, cls_num_list: Sequence[int] | Tensor | None) -> None:
        """The constructor's ``cls_num_list``: build the buffers now, or wait for the data's counts (``None``)."""
        if cls_num_list is not None:
            self.set_class_counts(cls_num_list)
            self.counts_from_data = False

    def set_class_counts(self, cls_num_list: Sequence[int] | Tensor) -> None:
        """Build the count-derived buffers from ``cls_num_list`` (replacing earlier ones), on the loss's device.

        Args:
            cls_num_list: training count of every class.

        Raises:
            ValueError: when a count is not positive, or the number of classes differs from the buffers'.
        """
        counts = check_class_counts(cls_num_list)
        for name in self.count_buffers:
            old = self._buffers.get(name)
            if old is not None and old.shape != counts.shape:
                raise ValueError(
                    f"{type(self).__name__} has {old.numel()} classes; got counts for {counts.numel()} classes"
                )
        built = self._count_buffers(counts)
        device = next((b.device for b in self._buffers.values() if b is not None), None)
        for name, value in built.items():
            self._buffers[name] = value if device is None else value.to(device)
        self.cls_num_list = tuple(int(n) if n.is_integer() else n for n in counts.tolist())

    def _require_counts(self) -> None:
        if not self.has_class_counts:
            raise RuntimeError(
                f"{type(self).__name__} was built without class counts (cls_num_list=None) and none were given "
                "since: train it through ReweightClassifier with a datamodule that has `train_class_counts`, or "
                "call set_class_counts([n_0, n_1, ...]) first"
            )

    def materialize_from(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """Create the count-derived buffers this loss still lacks with the shapes ``state_dict`` holds for them.

        ``load_state_dict`` then copies the values in. A no-op for buffers that exist or that ``state_dict`` lacks.
        """
        for name in self.count_buffers:
            value = state_dict.get(prefix + name)
            if self._buffers.get(name) is None and isinstance(value, Tensor):
                self._buffers[name] = torch.empty_like(value, device="cpu")

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self.materialize_from(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
