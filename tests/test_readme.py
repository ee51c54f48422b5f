"""Every Python example in the README runs, in order, against the test Redis.

The guides under ``docs/`` run theirs in ``tests/test_docs.py``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

import alkey

from .support.docs import README, python_blocks


def test_the_readme_has_one_complete_example() -> None:
    assert len(python_blocks(README.read_text(encoding="utf-8"))) >= 1


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
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    try:
        for number, block in enumerate(blocks, start=1):
            exec(compile(block, f"README.md python block {number}", "exec"), module.__dict__)
    finally:
        if hasattr(module, "Session"):
            alkey.unbind(module.Session)


def test_the_readme_stays_a_front_page() -> None:
    """About 200 lines: what alkey does, how to try it, where to read more."""
    assert README.read_text(encoding="utf-8").count("\n") <= 200
