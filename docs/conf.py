"""Sphinx configuration for the monai-adv documentation (as MONAI's own docs: Sphinx, autodoc, napoleon).

Build offline, warnings as errors, from the repository root::

    python -m sphinx -W --keep-going -b html docs build/docs/html

then open ``build/docs/html/index.html``. The API pages (``docs/api/<package>.rst``) are generated from the
docstrings by autodoc; every top-level page in ``docs/`` (user guide, results, performance, ...) is picked
up by the glob in ``index.md``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

# Document this checkout's package, not whichever copy happens to be installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import monai_adv

project = "monai-adv"
author = "monai-adv contributors"
copyright = "monai-adv contributors"
version = release = monai_adv.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args/Returns/Raises, as MONAI writes them
    "sphinx.ext.viewcode",
    "myst_parser",  # the Markdown pages (user guide, results, ...)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# autodoc: members in source order, signatures with their type hints, nothing imported at build time
# that the package does not import itself.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MyST: "#section" links between the Markdown pages, and ``` fences as in GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

html_theme = "pydata_sphinx_theme"
html_title = f"monai-adv {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_static_path: list[str] = []


def _package_api_lines(name: str) -> list[str]:
    """reST for one package's API page: its docstring, then every public submodule with its members
    (submodules added later appear without editing the page); a plain module is documented whole."""
    module = importlib.import_module(name)
    if not hasattr(module, "__path__"):
        return [f".. automodule:: {name}", ""]
    lines = [f".. automodule:: {name}", "   :no-members:", ""]
    for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            lines += [f".. automodule:: {name}.{info.name}", ""]
    return lines


# Top-level pages listed first in the contents, in this order; any other page follows alphabetically.
_PAGE_ORDER = ["user_guide", "results", "robustness", "performance"]
_DOCS_DIR = os.path.dirname(os.path.abspath(__file__))


def _top_level_pages() -> list[str]:
    """Every ``.md``/``.rst`` page directly in ``docs/`` except the index, in reading order."""
    names = {
        os.path.splitext(name)[0]
        for name in os.listdir(_DOCS_DIR)
        if os.path.splitext(name)[1] in source_suffix and os.path.splitext(name)[0] != root_doc
    }
    return sorted(names, key=lambda n: (_PAGE_ORDER.index(n) if n in _PAGE_ORDER else len(_PAGE_ORDER), n))


def _list_pages_in_index(app, docname: str, source: list[str]) -> None:
    """Fill the ``{pages}`` line of index.md's toctree with the top-level pages (a glob cannot order them,
    and warns while there are none besides the user guide)."""
    if docname == root_doc:
        source[0] = source[0].replace("{pages}", "\n".join(_top_level_pages()))


def setup(app):
    """Register ``.. monai-adv-api:: monai_adv.<package>``, used by the pages under ``docs/api/``."""
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective

    class PackageAPI(SphinxDirective):
        required_arguments = 1

        def run(self) -> list[nodes.Node]:
            container = nodes.container()
            lines = _package_api_lines(self.arguments[0])
            self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]), self.content_offset, container)
            return container.children

    app.add_directive("monai-adv-api", PackageAPI)
    app.connect("source-read", _list_pages_in_index)
    # The index depends on which pages exist: re-read it on every build, also an incremental one.
    app.connect("env-get-outdated", lambda app, env, added, changed, removed: [root_doc])
    return {"parallel_read_safe": True}
