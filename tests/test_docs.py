"""Every Python example of the documentation site's guides runs, page by page, in order.

A page's ```python blocks run in one module namespace, as a reader who pastes them one
after another would run them. A page whose examples build on another's says so in its
text and in a marker the runner reads, ``<!-- examples continue: getting-started.md -->``:
that page's examples run first, in the same namespace.

Pages describing applications of their own run their examples in the tests of that
integration (:data:`OWN_TESTS`), and the examples that need servers of their own (a
Sentinel, a cluster) run against real ones in the tests named in :data:`OWN_BLOCKS`.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import alkey

from .support.docs import DOCS, README, docs_page, python_blocks

#: Pages whose examples run in tests of their own, and where.
OWN_TESTS = {
    "integrations/pyramid.md": "tests/test_pyramid.py",
    "integrations/flask.md": "tests/test_flask.py",
    "integrations/sqlmodel.md": "tests/test_docs_recipes.py",
    "integrations/celery.md": "tests/test_docs_recipes.py",
    "integrations/fastapi.md": "tests/test_docs_recipes.py",
    "front-ends.md": "tests/test_docs_recipes.py",
    "asyncio.md": "tests/test_asyncio_docs.py",
    "testing.md": "tests/test_pytest_plugin.py",
    "migrating.md": "tests/test_docs_guarantees.py",
    "outside-writes.md": "tests/test_cdc.py",
}
#: Blocks that need servers of their own, by page and a text that tells them apart.
OWN_BLOCKS = {
    "deploying.md": {
        "Sentinel(": "tests/test_sentinel.py",
        "RedisCluster(": "tests/test_cluster.py",
    },
}
#: Pages written by the benchmarks (no examples) and the API reference (docstrings).
GENERATED = ("benchmarks.md", "cdc.md", "cluster.md", "cpu.md", "localcache.md", "reference/")

CONTINUES = re.compile(r"<!-- examples continue: ([\w/.-]+\.md) -->")


def guide_pages() -> list[str]:
    pages = sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md"))
    return [
        page
        for page in pages
        if not page.startswith(("_build/", *GENERATED)) and page not in OWN_TESTS
    ]


def examples(page: str) -> Iterator[tuple[str, str]]:
    """``(where, block)`` for every block that runs for ``page``: those of the pages it
    continues first, then its own, less those that run elsewhere."""
    text = docs_page(page)
    for continued in CONTINUES.findall(text):
        yield from examples(continued)
    owned = OWN_BLOCKS.get(page, {})
    for number, block in enumerate(python_blocks(text), start=1):
        if not any(mark in block for mark in owned):
            yield f"docs/{page} python block {number}", block


def test_the_guides_have_python_examples() -> None:
    assert sum(len(python_blocks(docs_page(page))) for page in guide_pages()) >= 15


def test_every_page_said_to_be_tested_elsewhere_exists_and_has_examples() -> None:
    for page in OWN_TESTS:
        assert python_blocks(docs_page(page)), f"docs/{page} has no example to test"
    for page, marks in OWN_BLOCKS.items():
        blocks = python_blocks(docs_page(page))
        for mark in marks:
            assert sum(mark in block for block in blocks) == 1, f"docs/{page}: {mark}"


@pytest.mark.parametrize("page", guide_pages())
def test_every_example_of_the_page_runs_and_its_assertions_hold(
    page: str,
    redis_url: str,
    redis_client: Any,
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment_redis(redis_url)
    # SQLAlchemy resolves annotations through sys.modules, so the examples need a module.
    module = types.ModuleType("docs_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for where, block in examples(page):
            exec(compile(block, where, "exec"), module.__dict__)
    finally:
        for name in ("Session", "scoped"):
            if hasattr(module, name):
                alkey.unbind(getattr(module, name))


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub and MyST give a heading: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    outside_code = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#{1,6} (.+)$", outside_code, re.MULTILINE)}


def test_every_link_of_the_readme_and_the_guides_reaches_its_page_and_heading() -> None:
    """Sphinx checks the guides' links as it builds; this checks the README's too (it is
    not part of the site), and both as GitHub shows them: a relative link must name a
    file of the repository, and its ``#anchor`` a heading of that file."""
    sources = [README, *(path for path in DOCS.rglob("*.md") if "_build" not in path.parts)]
    broken = []
    for source in sources:
        text = source.read_text(encoding="utf-8")
        for target in MARKDOWN_LINK.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            if not path.exists():
                broken.append(f"{source.name}: {target} (no such file)")
            elif (
                anchor
                and path.suffix == ".md"
                and anchor not in anchors(path.read_text(encoding="utf-8"))
            ):
                broken.append(f"{source.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_and_the_concepts_page_draw_the_same_diagram() -> None:
    """One picture of the write and read paths, kept as text beside the code; the copy in
    docs/concepts.md must not drift from the README's."""
    diagram = re.compile(r"```mermaid\n.*?```", re.DOTALL)
    [in_readme] = diagram.findall(README.read_text(encoding="utf-8"))
    [in_concepts] = diagram.findall(docs_page("concepts.md"))
    assert in_readme == in_concepts
