"""Sphinx configuration: Markdown pages (MyST) and an API reference generated from docstrings."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import lightning_reweight  # noqa: E402

project = "lightning_reweight"
author = "lightning_reweight developers"
release = lightning_reweight.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_static_path = ["_static"]
suppress_warnings = ["myst.header"]
# Lightning and torch types appear in signatures; their own docs are not linked here.
nitpicky = False
