"""Sphinx configuration of the deq_jax documentation site (MyST Markdown pages, the four
notebooks through myst-nb, the API reference from the docstrings).

    python3 -m pip install -e ".[docs]"
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

The notebooks are rendered as stored (``nb_execution_mode = "off"``): the suite already runs
them (``tests/test_docs.py`` executes each once and builds the site with those outputs, with
warnings as errors). To render them with their figures by hand, execute them in the build:
``python3 -m sphinx -D nb_execution_mode=force -b html docs docs/_build/html`` (about as long
as running the notebooks; ``DEQ_JAX_QUICK=1`` for their small sizes).
"""

import os
import sys

# Document this checkout's deq_jax, not whichever copy the environment has installed. realpath:
# the suite builds from a staged folder whose conf.py is a link to this file.
ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.realpath(__file__)), ".."))
sys.path.insert(0, ROOT)

import deq_jax  # noqa: E402

project = "deq_jax"
author = "deq_jax authors"
copyright = "2026, deq_jax authors"
release = version = deq_jax.__version__

extensions = [
    "myst_nb",  # MyST Markdown pages and .ipynb notebooks (myst-nb registers myst_parser)
    "sphinx.ext.autodoc",  # the API pages are automodule/autofunction directives
    "sphinx.ext.napoleon",  # the docstrings' Google-style Args:/Returns:/Attributes: sections
    "sphinx.ext.mathjax",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # [text](page.md#a-heading) links to headings down to ###
nb_execution_mode = "off"  # rendered as stored; see the module docstring
nb_merge_streams = True

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc lists NamedTuple fields itself
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
add_module_names = False

# results/ holds the reproduction scripts' own results.md pages and figures, which
# docs/results.md links to as files; runs/ their raw run folders (git-ignored).
exclude_patterns = ["_build", "results/**", "**/.ipynb_checkpoints"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Deep equilibrium models with Jacobian regularization, in JAX",
                      "fixed_sidebar": True}
