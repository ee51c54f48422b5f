"""Every Python example in the README runs, in order, against the test Redis.

The Pyramid, Flask-SQLAlchemy and asyncio sections describe applications of their own;
their examples run in tests/test_pyramid.py, tests/test_flask.py and
tests/test_asyncio_docs.py; Deploying's run against the servers they name, in
tests/test_sentinel.py.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

import alkey

from .conftest import README, python_blocks, readme_section

OWN_TESTS = ("Pyramid", "Flask-SQLAlchemy", "asyncio", "Deploying")


def core_blocks() -> list[str]:
    markdown = README.read_text(encoding="utf-8")
    for heading in OWN_TESTS:
        markdown = markdown.replace(readme_section(heading), "\n")
    return python_blocks(markdown)


def test_the_readme_has_python_examples() -> None:
    assert len(core_blocks()) >= 5


def test_every_readme_example_runs_and_its_assertions_hold(
    redis_url: str,
    redis_client: Any,
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment_redis(redis_url)
    # SQLAlchemy resolves annotations through sys.modules, so the examples need a module.
    module = types.ModuleType("readme_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for number, block in enumerate(core_blocks(), start=1):
            exec(compile(block, f"README.md python block {number}", "exec"), module.__dict__)
    finally:
        if hasattr(module, "Session"):
            alkey.unbind(module.Session)
