"""The meta-gradient engine and its strategies."""

__all__: list[str] = []
