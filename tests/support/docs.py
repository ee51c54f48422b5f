"""Running the README's examples (and other Markdown's) as a reader would."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
README = ROOT / "README.md"
#: The documentation site's sources (``make docs``): Markdown guides under ``docs/``.
DOCS = ROOT / "docs"


def docs_page(name: str) -> str:
    """The text of the docs page ``name`` (a path under ``docs/``, e.g. ``"asyncio.md"``)."""
    return (DOCS / name).read_text(encoding="utf-8")


def readme_section(heading: str, path: Path = README) -> str:
    """The README's (or ``path``'s) text under ``## heading``, up to the next ``## ``."""
    markdown = "\n" + path.read_text(encoding="utf-8")  # a heading on the first line too
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


def run_python_examples(markdown: str, directory: Path) -> None:
    """Run every ```python block of ``markdown``, in order, as a reader would.

    A block whose first line is ``# path/to/module.py`` is that file: it is written under
    ``directory`` (which must be on ``sys.path``) and imported. Any other block runs as a
    script, importing what it needs from those modules.
    """
    blocks = python_blocks(markdown)
    files = [re.fullmatch(r"# ([\w/]+\.py)", block.splitlines()[0]) for block in blocks]
    for block, file in zip(blocks, files, strict=True):  # all files first, like a project
        if file:
            path = directory / file.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block, encoding="utf-8")
    importlib.invalidate_caches()
    for number, (block, file) in enumerate(zip(blocks, files, strict=True), start=1):
        if file:
            module = file.group(1).removesuffix(".py").removesuffix("/__init__")
            importlib.import_module(module.replace("/", "."))
        else:
            script = compile(block, f"README.md python block {number}", "exec")
            exec(script, {"__name__": "docs_example"})


@pytest.fixture
def docs_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable directory for the docs' modules, forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    imported_before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - imported_before:
        del sys.modules[name]
