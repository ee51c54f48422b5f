"""Every Python example in the README runs, in order, against the test Redis."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

import alkey
from alkey import client as alkey_client

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 5


def test_every_readme_example_runs_and_its_assertions_hold(
    redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(alkey_client, "_default_client", None)
    # SQLAlchemy resolves annotations through sys.modules, so the examples need a module.
    module = types.ModuleType("readme_examples")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    try:
        for number, block in enumerate(BLOCKS, start=1):
            code = compile(block, f"README.md python block {number}", "exec")
            exec(code, namespace)
    finally:
        if "Session" in namespace:
            alkey.unbind(namespace["Session"])
        default = alkey_client._default_client
        if default is not None:
            default.close()
