"""Sphinx configuration of the chemfit documentation.

Build with ``make docs`` (warnings are errors), or by hand::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

The notebooks in ``../notebooks`` are rendered without being executed (the test suite executes
them, tests/integration/test_notebooks.py). They are copied into ``docs/notebooks/`` (generated, not
committed) when the build starts: a symbolic link does not work, because MyST resolves the links
between notebooks to their real location, outside the documentation's source folder.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))


def _copy_notebooks() -> None:
    """Mirror ../notebooks/*.ipynb into docs/notebooks/, touching only what changed."""
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    sources = {path.name: path for path in (ROOT / "notebooks").glob("*.ipynb")}
    for stale in target.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, source in sources.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != source.read_bytes():
            shutil.copyfile(source, copy)


_copy_notebooks()

from chemfit import __version__  # noqa: E402

project = "chemfit"
author = "chemfit developers"
copyright = "chemfit developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- MyST and notebooks -------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are executed by the tests, not by the docs build

# -- API reference ------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes" sections as fields: no duplicates of documented properties

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"chemfit {release}"
html_theme_options = {
    "description": "Fit simulation models to reference data, serially or in parallel.",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
