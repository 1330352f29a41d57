"""What the probes must know about layers (private)."""

from __future__ import annotations

from torch import nn

__all__ = ["is_compiled", "rewrites_own_weights"]


def rewrites_own_weights(module: nn.Module) -> bool:
    """Whether ``module``'s forward writes its own weights in place.

    ``Embedding(max_norm=...)`` and ``EmbeddingBag(max_norm=...)`` renormalise the rows they look up: a probe that
    runs extra forwards must give them copies, or restore them, even when they are frozen.

    Example:
        >>> rewrites_own_weights(nn.Embedding(5, 2, max_norm=1.0)), rewrites_own_weights(nn.Embedding(5, 2))
        (True, False)
    """
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` itself runs ``torch.compile``'d code.

    ``torch.compile(module)`` (an ``OptimizedModule``), ``module.compile()`` (in place), or a LightningModule
    given to the Trainer compiled (Lightning unwraps it and compiles its ``forward``/``training_step``). Compiled
    code supports no double backward, and a backward through its graph may run only once.

    Example:
        >>> is_compiled(nn.Linear(2, 2))
        False
    """
    return (
        type(module).__name__ == "OptimizedModule"
        or getattr(module, "_compiled_call_impl", None) is not None
        or bool(getattr(module, "_compiler_ctx", None))
    )
