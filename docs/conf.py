"""Sphinx configuration for the pop3proto documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

No intersphinx: CI has no network beyond package registries, so a remote
inventory (docs.python.org) cannot be fetched; pages link to the Python
documentation with plain URLs instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's pop3proto
sys.path.insert(0, str(HERE / "_ext"))

import pop3proto  # noqa: E402

project = "pop3proto"
author = "the pop3proto authors"
copyright = "the pop3proto authors"
release = pop3proto.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings use Google-style Args/Returns/Raises
    "pop3proto_docs",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# Docstrings in pop3proto/ are plain reST-ish prose; missing cross-reference
# targets there must not fail the -W build.
nitpicky = False
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_title = f"pop3proto {release}"


def _known_markup(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    """Work around one docstring that is not valid reST (reported; drop this once fixed).

    ``pop3proto.SaslChallenge`` writes a literal with a trailing space inside
    (two backquotes, "+ ", two backquotes), which docutils rejects.
    """
    for i, line in enumerate(lines):
        lines[i] = line.replace("``+ ``", '"+ "')


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-docstring", _known_markup)
