"""Sphinx configuration of alkey's documentation site (``make docs``).

The guides are Markdown (MyST), so the same files read well on GitHub; the API reference
is generated from the docstrings by autodoc. The build is strict: ``make docs`` runs with
warnings as errors and ``nitpicky`` on, so a broken reference, a missing docstring of a
public name, or a public name without a reference entry fails it (see ``_check_*`` below).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import alkey  # noqa: E402  (after the path above)

project = "alkey"
author = "alkey contributors"
copyright = "alkey contributors, released into the public domain (Unlicense)"
release = version = alkey.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "sphinxcontrib.mermaid",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
myst_fence_as_directive = ["mermaid"]
html_theme = "furo"
html_title = "alkey"
nitpicky = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}

#: The libraries alkey's signatures and docstrings name. The build has no network, so no
#: intersphinx: references into them stay plain text. Only these prefixes are ignored; a
#: reference to an ``alkey`` name must resolve.
EXTERNAL = (
    "aiocache",
    "asyncio",
    "binascii",
    "cashews",
    "collections",
    "datetime",
    "dogpile",
    "enum",
    "flask_caching",
    "functools",
    "logging",
    "opentelemetry",
    "os",
    "prometheus_client",
    "pyramid",
    "redis",
    "sqlalchemy",
    "sys",
    "threading",
    "time",
    "typing",
    "valkey",
    "webob",
    "zope",
)
nitpick_ignore_regex = [
    (r"py:.*", rf"({'|'.join(EXTERNAL)})(\..+)?"),
    # the private type variables of generic signatures (``_T``), which have no entry
    (r"py:.*", r"~?(alkey(\.\w+)*\.)?_[A-Z]\w*"),
]

#: Short external names that type hints leave unqualified (autodoc renders some
#: annotations of ``from __future__ import annotations`` modules as written): their
#: full name, which is external, so they are treated as above.
EXTERNAL_SHORT_NAMES = {
    # alkey.transports' aliases of redis-py's cluster clients
    "AsyncClusterClient": "redis.asyncio.cluster.RedisCluster",
    "BaseCache": "aiocache.base.BaseCache",
    "Cache": "flask_caching.Cache",
    "CollectorRegistry": "prometheus_client.CollectorRegistry",
    "Meter": "opentelemetry.metrics.Meter",
    "MeterProvider": "opentelemetry.metrics.MeterProvider",
    "timedelta": "datetime.timedelta",
    "ClusterClient": "redis.cluster.RedisCluster",
    "Engine": "sqlalchemy.engine.Engine",
    "MetaData": "sqlalchemy.MetaData",
    "Session": "sqlalchemy.orm.Session",
}

logger = logging.getLogger(__name__)


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


@functools.cache
def _reexports(module: str) -> dict[str, str]:
    """``{name: module it comes from}`` for the names of ``module.__all__`` imported from
    another public ``alkey`` module (``alkey.bind``, ``alkey.cache.get_token``).

    Each is documented once, where it is defined: the module re-exporting it lists it
    with a link instead (see ``_note_reexports``), so no object has two entries.
    """
    imported = importlib.import_module(module)
    homes = {
        alias.asname or alias.name: statement.module
        for statement in ast.parse(inspect.getsource(imported)).body
        if isinstance(statement, ast.ImportFrom)
        and statement.module
        and statement.module.split(".")[0] == "alkey"
        and _public(statement.module)
        for alias in statement.names
    }
    return {name: homes[name] for name in getattr(imported, "__all__", ()) if name in homes}


def _documented_as(env: BuildEnvironment, module: str, name: str) -> str | None:
    """The reference entry of ``module.name`` -- for a re-export, the entry where it is
    defined -- or ``None`` if it has none."""
    home = _reexports(module).get(name)
    if home is not None:
        return _documented_as(env, home, name)
    entry = f"{module}.{name}"
    return entry if entry in env.get_domain("py").objects else None


def _skip_reexport(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Leave a module's re-exports out of its members (they are documented at home)."""
    module = app.env.current_document.autodoc_module
    return True if what == "module" and name in _reexports(module) else None


def _note_reexports(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """End a module's docstring with links to the names it re-exports."""
    if what == "module" and _reexports(name):
        links = [f":py:obj:`~{home}.{n}`" for n, home in _reexports(name).items()]
        lines += ["", f"Also importable from here, documented where defined: {', '.join(links)}."]


def _resolve_elsewhere(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.TextElement
) -> nodes.Node | None:
    """Resolve what the Python domain cannot: an external short name as its external
    library (text, like the ignored prefixes), and a re-export (``alkey.bind``) as the
    entry of the object it names. Anything else is still reported."""
    target = node["reftarget"]
    if node.get("refdomain") != "py":
        return None
    if target in EXTERNAL_SHORT_NAMES:
        return contnode
    module, _, name = target.rpartition(".")
    if module not in env.get_domain("py").modules or name not in _reexports(module):
        return None
    home = _documented_as(env, module, name)
    if home is None:
        return None
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], home, node, contnode
    )


class AutoInterface(SphinxDirective):
    """``.. autointerface:: alkey.interfaces.IName``: a :mod:`zope.interface` Interface as
    a ``py:class`` entry, with its docstring and its methods'.

    An Interface is an object, not a class, so autodoc does not document it; written by
    hand, its text would drift from the docstring.
    """

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module, _, name = self.arguments[0].rpartition(".")
        interface = getattr(importlib.import_module(module), name)
        docstring = inspect.cleandoc(interface.__doc__ or "").splitlines()
        _check_docstring(self.env.app, "class", self.arguments[0], interface, {}, docstring)
        lines = [f".. py:class:: {name}", f"   :module: {module}", ""]
        lines += [f"   {line}" for line in docstring]
        for attribute in interface.names():
            method = interface[attribute]
            lines += ["", f"   .. py:method:: {attribute}{method.getSignatureString()}", ""]
            lines += [
                f"      {line}" for line in inspect.cleandoc(method.__doc__ or "").splitlines()
            ]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, self.get_source_info()[0]), 0, container)
        return container.children


def _check_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Warn of a public name documented without a docstring.

    The API reference is generated from the docstrings, so a public name without one
    shows as a bare signature: the reader learns nothing the code's types don't say.
    """
    if _public(name) and not any(line.strip() for line in lines):
        logger.warning(
            "%s has no docstring: write one (the API reference is generated from it)",
            name,
            type="alkey",
            subtype="docstring",
        )


def _check_all_documented(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn of a name in ``__all__`` of a documented ``alkey`` module that has no
    reference entry, under that module or (re-exported) under the one it comes from.

    ``__all__`` is the public contract; a name missing from the reference is public yet
    undocumented -- one its module leaves out of the members autodoc documents, say.
    """
    for module in sorted(env.get_domain("py").modules):
        if module.split(".")[0] != "alkey":
            continue
        for name in getattr(importlib.import_module(module), "__all__", ()):
            if _documented_as(env, module, name) is None:
                logger.warning(
                    "%s.%s is in __all__ but has no entry in the API reference (autodoc "
                    "leaves out a module constant without a #: comment)",
                    module,
                    name,
                    type="alkey",
                    subtype="reference",
                    location=env.get_domain("py").modules[module].docname,
                )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("autointerface", AutoInterface)
    app.connect("missing-reference", _resolve_elsewhere)
    app.connect("autodoc-skip-member", _skip_reexport)
    app.connect("autodoc-process-docstring", _check_docstring)  # before a note is added
    app.connect("autodoc-process-docstring", _note_reexports)
    app.connect("env-check-consistency", _check_all_documented)
    return {"parallel_read_safe": True}
