"""Loss modules (``nn.Module``); state that must survive checkpoints and ``.to(device)`` is a buffer."""

from lightning_reweight.losses.absgd import AttentionalDROLoss

__all__: list[str] = ["AttentionalDROLoss"]
