"""Loss modules (``nn.Module``); state that must survive checkpoints and ``.to(device)`` is a buffer."""

__all__: list[str] = []
