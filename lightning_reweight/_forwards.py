"""Forwards the library runs besides the training step's own (private).

Meta-gradient routes and the susceptibility probe call the user's module on other inputs or at other parameters;
a hook that wants the training step's own forward (the monitor's ``"train_forward"`` subset accuracy) skips the
forwards run inside :func:`extra_forwards`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["extra_forwards", "in_extra_forward"]

_depth = 0


@contextlib.contextmanager
def extra_forwards() -> Iterator[None]:
    """Mark the forwards run inside the block as the library's own, not the training step's.

    Example:
        >>> with extra_forwards():
        ...     in_extra_forward()
        True
        >>> in_extra_forward()
        False
    """
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_extra_forward() -> bool:
    """Whether a forward now running is one of the library's own (see :func:`extra_forwards`)."""
    return _depth > 0
