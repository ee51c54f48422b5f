"""Every Python example of the asyncio guide (``docs/asyncio.md``) runs, in order."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

import alkey

from .support.docs import docs_page, python_blocks


def test_the_asyncio_section_has_python_examples() -> None:
    assert len(python_blocks(docs_page("asyncio.md"))) >= 3


def test_every_asyncio_example_runs_and_its_assertions_hold(
    redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    # SQLAlchemy resolves annotations through sys.modules, so the examples need a module.
    module = types.ModuleType("asyncio_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    blocks = python_blocks(docs_page("asyncio.md"))
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"docs/asyncio.md python block {number}", "exec"), module.__dict__)
    finally:
        if hasattr(module, "Session"):
            alkey.unbind(module.Session)
    assert redis_client.exists("alkey:users#1", "myapp:alkey:users#1") == 2
