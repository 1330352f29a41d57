"""Loss state that stays float32 whatever precision the module is cast to (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class Float32Buffers(nn.Module):
    """A module whose floating buffers keep their dtype under ``.to(dtype)``, ``.half()``, ``.bfloat16()``.

    Lightning's ``precision="bf16-true"`` / ``"16-true"`` cast the whole LightningModule, buffers included.
    A loss's constants and running statistics (margins, class weights, log-prior offsets, ABSGD's moving average)
    would then be rounded to 8 bits of mantissa; this keeps them float32 (their values exact) while device moves
    still apply. Parameters are not affected.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        result = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(device=after.device)  # the original values, on the new device
        return result
