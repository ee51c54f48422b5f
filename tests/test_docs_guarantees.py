"""docs/guarantees.md cites the tests that prove each guarantee: they must exist.

Every ``tests/<file>.py::<test>`` the page names is looked up in that module's syntax tree
(not imported: the servers some modules need are not started here), so a renamed or
deleted test fails this one instead of leaving the page citing nothing. A case of a
parametrized test, ``::<test>[<id>]``, must name a test that is parametrized, with an id
whose every ``-``-separated part is a string written in the module.

docs/migrating.md's Python examples run here too (tests/test_docs.py leaves them to this
module), in order, in one fresh module, against the test Redis named by ``REDIS_URL``.
"""

from __future__ import annotations

import ast
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import alkey

from .support.docs import DOCS, python_blocks

ROOT = DOCS.parent
GUARANTEES = DOCS / "guarantees.md"
MIGRATING = DOCS / "migrating.md"

#: A cited test: `tests/test_keys.py::test_name` or `tests/test_keys.py::test_name[id]`.
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]`]+)\])?`")


@dataclass(frozen=True)
class Citation:
    path: str
    test: str
    case: str | None

    def __str__(self) -> str:
        return f"{self.path}::{self.test}" + (f"[{self.case}]" if self.case else "")


def citations(markdown: str) -> list[Citation]:
    return [Citation(*match.groups()) for match in CITATION.finditer(markdown)]


def sections(markdown: str) -> dict[str, str]:
    """The text under each ``## `` heading, up to the next one."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def defined_tests(tree: ast.Module) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """The module's test functions, at module level or in test classes, by name."""
    found: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "test"
        ):
            found[node.name] = node
    return found


def is_parametrized(function: ast.FunctionDef | ast.AsyncFunctionDef, tree: ast.Module) -> bool:
    """Decorated with ``parametrize``, or in a module that parametrizes its tests itself
    (``pytest_generate_tests``, or the ``flavours`` mark that conftest expands)."""
    decorators = " ".join(ast.unparse(decorator) for decorator in function.decorator_list)
    module = ast.unparse(tree)
    return "parametrize" in decorators or any(
        hook in module for hook in ("def pytest_generate_tests", "mark.flavours")
    )


def strings_in(tree: ast.Module) -> set[str]:
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def problem(citation: Citation) -> str | None:
    """Why ``citation`` names no test that exists, or None when it does."""
    path = ROOT / citation.path
    if not path.is_file():
        return f"{citation}: no file {citation.path}"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    function = defined_tests(tree).get(citation.test)
    if function is None:
        return f"{citation}: no test {citation.test} in {citation.path}"
    if citation.case is None:
        return None
    if not is_parametrized(function, tree):
        return f"{citation}: {citation.test} is not parametrized"
    unknown = [part for part in citation.case.split("-") if part not in strings_in(tree)]
    if unknown:
        return f"{citation}: no case {', '.join(unknown)} is written in {citation.path}"
    return None


def test_the_guarantees_page_cites_tests() -> None:
    assert len(citations(GUARANTEES.read_text(encoding="utf-8"))) >= 50


def test_every_test_the_guarantees_page_cites_exists() -> None:
    cited = citations(GUARANTEES.read_text(encoding="utf-8"))
    assert [found for citation in cited if (found := problem(citation))] == []


def test_a_citation_of_a_test_that_does_not_exist_is_reported() -> None:
    """The check above can fail: a missing file, a missing test, an unknown case."""
    assert problem(Citation("tests/test_nothing_here.py", "test_x", None))
    assert problem(Citation("tests/test_keys.py", "test_that_was_never_written", None))
    assert problem(
        Citation("tests/test_roundtrips.py", "test_a_read_only_commit_costs_no_round_trip", "x")
    )
    assert problem(
        Citation(
            "tests/test_stale_reads.py",
            "test_no_read_is_ever_staler_than_the_last_committed_write",
            "no_such_scenario",
        )
    )
    assert (
        problem(
            Citation(
                "tests/test_stale_reads.py",
                "test_no_read_is_ever_staler_than_the_last_committed_write",
                "killed_writer",
            )
        )
        is None
    )


def test_every_section_of_the_guarantees_page_cites_a_test() -> None:
    page = sections(GUARANTEES.read_text(encoding="utf-8"))
    assert len(page) >= 10
    assert [heading for heading, text in page.items() if not citations(text)] == []


def test_the_guarantees_page_has_one_title() -> None:
    titles = re.findall(r"^# .+$", GUARANTEES.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert titles == ["# Guarantees and their bounds"]


# -- docs/migrating.md's examples ------------------------------------------------------------


@pytest.fixture
def example_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """A fresh module for the examples to run in, registered in ``sys.modules`` (SQLAlchemy
    resolves annotations through it); the sessions they bind are unbound after."""
    module = types.ModuleType("migrating_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield module
    if hasattr(module, "Session"):
        alkey.unbind(module.Session)


def test_every_python_example_of_the_migration_guide_runs(
    redis_url: str,
    redis_client: Any,
    environment_redis: Callable[[str], None],
    example_module: types.ModuleType,
) -> None:
    blocks = python_blocks(MIGRATING.read_text(encoding="utf-8"))
    assert blocks, "docs/migrating.md has no Python example"
    environment_redis(redis_url)  # redis_client: a flushed database for the examples
    for number, block in enumerate(blocks, start=1):
        code = compile(block, f"docs/migrating.md python block {number}", "exec")
        exec(code, example_module.__dict__)
