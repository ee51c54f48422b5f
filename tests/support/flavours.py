"""The sync and asyncio flavours, and the session drivers.

A test module marked ``pytest.mark.flavours("sync", "asyncio")`` runs each test that uses
``session``, ``sessions`` or ``key_generator`` twice: with a sync
:class:`~sqlalchemy.orm.Session` and ``redis.Redis``, and with an
:class:`~sqlalchemy.ext.asyncio.AsyncSession` and ``redis.asyncio`` on an event loop of the
test's own, behind the same synchronous face (:class:`SessionAPI`). Elsewhere these
fixtures are sync.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pytest
import redis.asyncio
from sqlalchemy import Engine, ScalarResult
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

import alkey
import alkey.asyncio
from alkey.asyncio import AsyncCacheKeyGenerator, AsyncRedisClient
from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisClient, TokenStore, store_for

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


@pytest.fixture
def session_factory(tables: Engine, redis_client: RedisClient) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker bound to alkey, writing tokens to the test Redis."""
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, redis_client=redis_client)
    yield factory
    alkey.unbind(factory)


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


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Shut ``loop`` down the way ``asyncio.run()`` does: cancel its tasks, then close it."""
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


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the test's own, shut down the way ``asyncio.run()`` does."""
    loop = asyncio.new_event_loop()
    yield loop
    close_loop(loop)


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
