"""Every docstring example in the package runs and prints what it says (the public API's runnable examples)."""

import doctest
import importlib
import pkgutil

import pytest

import lightning_reweight

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(lightning_reweight.__path__, prefix="lightning_reweight.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_the_package_has_docstring_examples():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for name in MODULES for t in finder.find(importlib.import_module(name)))
    assert examples >= 100
