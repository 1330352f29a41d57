"""Loss modules (``nn.Module``); state that must survive checkpoints and ``.to(device)`` is a buffer."""

from lightning_reweight.losses.absgd import AttentionalDROLoss
from lightning_reweight.losses.ldam import LDAMLoss
from lightning_reweight.losses.logit_adjusted import LogitAdjustedLoss

__all__: list[str] = ["AttentionalDROLoss", "LDAMLoss", "LogitAdjustedLoss"]
