"""Sphinx configuration of the deq_jax API reference (built from the docstrings).

    python -m sphinx -W --keep-going -b html docs/api docs/api/_build/html

``tests/test_docs.py`` runs that build with warnings as errors, so a broken docstring fails
the suite.
"""

import os
import sys

# Document this checkout's deq_jax, not whichever copy the environment has installed.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import deq_jax  # noqa: E402

project = "deq_jax"
author = "deq_jax authors"
release = version = deq_jax.__version__

extensions = [
    "sphinx.ext.autodoc",  # the pages are automodule/autofunction directives over the docstrings
    "sphinx.ext.napoleon",  # the docstrings' Google-style Args:/Returns:/Attributes: sections
]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc lists NamedTuple fields itself
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
add_module_names = False

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
