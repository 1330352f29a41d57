"""Pure tensor maths, no Lightning: each method's core formula, testable against the papers."""

__all__: list[str] = []
