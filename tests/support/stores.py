"""The token stores under the store contract, each kind behind one synchronous face.

``tests/test_store_contract.py`` runs every contract test once per entry of
:data:`STORE_KINDS`. A kind is a name and a function that opens a store of that kind on a
Redis URL with the given options, wrapped in a :class:`StoreUnderTest`. Adding a kind --
a cluster, a sentinel, valkey, a store with a local cache -- is adding one entry (and, for
a new flavour, one :class:`StoreUnderTest` subclass).

Every store is opened on a client of its own that counts its round trips
(:class:`alkey.testing.RoundTrips`), with no retries, so that
an outage shows at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import valkey
import valkey.asyncio
import valkey.backoff
import valkey.retry
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.asyncio import AsyncRedisClient, AsyncRedisTokenStore
from alkey.testing import (
    AsyncCountingMixin,
    CountingMixin,
    async_counting_client,
    counting_client,
)
from alkey.tokens import RedisClient, RedisTokenStore

_T = TypeVar("_T")

#: Seconds a store's client waits for Redis. The outages here are stopped servers, which
#: refuse a connection at once, so the wait costs them nothing; it is long because a
#: machine busy with the rest of the suite can hold a fetch of thousands of keys past a
#: fraction of a second, and a store answers a timeout with fresh tokens of its own.
#: (A test of a hung server sets a short timeout of its own.)
SOCKET_TIMEOUT = 2.0


class StoreUnderTest:
    """One store, of any kind and flavour, with a synchronous face.

    ``fetch``, ``bump``, ``intend``, ``pending`` and ``wait_replayed`` are the store's own
    calls (awaited on the test's event loop for an asyncio store); :meth:`idle` lets time
    pass with whatever runs the store's background work running; :meth:`fetch_concurrently`
    fetches from many threads or tasks at once.
    """

    #: The store itself.
    store: Any

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def bump(self, identifiers: Sequence[str], intent: str | None = None) -> None:
        raise NotImplementedError

    def intend(self, identifiers: Sequence[str]) -> str | None:
        raise NotImplementedError

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump waits for Redis to answer again."""
        pending: frozenset[str] = self.store.pending
        return pending

    def wait_replayed(self, timeout: float) -> bool:
        raise NotImplementedError

    def idle(self, seconds: float) -> None:
        """Make no call for ``seconds``, as an application that fell idle."""
        raise NotImplementedError

    def fetch_concurrently(self, identifiers: Sequence[str], callers: int) -> list[list[str]]:
        """What each of ``callers`` concurrent fetches of ``identifiers`` answered."""
        raise NotImplementedError

    def probe_now(self) -> None:
        """Let the next call try Redis at once, as it does once ``retry_interval`` has
        passed since the last failure -- without the background replay getting there
        first. (The one reach past the store's calls: its outage ledger.)"""
        self.store.outage.probe_now()

    def close(self) -> None:
        raise NotImplementedError


class SyncStore(StoreUnderTest):
    """A :class:`~alkey.tokens.RedisTokenStore` on a redis-py client; threads race."""

    store: RedisTokenStore

    def __init__(self, store: RedisTokenStore, client: RedisClient) -> None:
        self.store = store
        self.client = client

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return self.store.fetch(identifiers)

    def bump(self, identifiers: Sequence[str], intent: str | None = None) -> None:
        self.store.bump(identifiers, intent=intent)

    def intend(self, identifiers: Sequence[str]) -> str | None:
        return self.store.intend(identifiers)

    def wait_replayed(self, timeout: float) -> bool:
        return self.store.wait_replayed(timeout)

    def idle(self, seconds: float) -> None:
        threading.Event().wait(seconds)

    def fetch_concurrently(self, identifiers: Sequence[str], callers: int) -> list[list[str]]:
        start = threading.Barrier(callers)
        answers: list[list[str]] = [[] for _ in range(callers)]

        def fetch(index: int) -> None:
            start.wait()
            answers[index] = self.store.fetch(identifiers)

        threads = [threading.Thread(target=fetch, args=(n,)) for n in range(callers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return answers

    def close(self) -> None:
        self.client.close()


class AsyncStore(StoreUnderTest):
    """An :class:`~alkey.asyncio.AsyncRedisTokenStore` on a ``redis.asyncio`` client,
    each call awaited on ``loop`` (whose tasks -- the background replay -- run only while
    a call or :meth:`idle` runs it, as in an application); tasks race."""

    store: AsyncRedisTokenStore

    def __init__(
        self, store: AsyncRedisTokenStore, client: AsyncRedisClient, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.store = store
        self.client = client
        self.loop = loop

    def _run(self, call: Awaitable[_T]) -> _T:
        return self.loop.run_until_complete(call)

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return self._run(self.store.afetch(identifiers))

    def bump(self, identifiers: Sequence[str], intent: str | None = None) -> None:
        self._run(self.store.abump(identifiers, intent=intent))

    def intend(self, identifiers: Sequence[str]) -> str | None:
        return self._run(self.store.aintend(identifiers))

    def wait_replayed(self, timeout: float) -> bool:
        return self._run(self.store.wait_replayed(timeout))

    def idle(self, seconds: float) -> None:
        self._run(asyncio.sleep(seconds))

    def fetch_concurrently(self, identifiers: Sequence[str], callers: int) -> list[list[str]]:
        async def race() -> list[list[str]]:
            return list(
                await asyncio.gather(*(self.store.afetch(identifiers) for _ in range(callers)))
            )

        return self._run(race())

    def close(self) -> None:
        self._run(self.client.aclose())


def open_sync_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    client = counting_client(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )
    return SyncStore(RedisTokenStore(client, **options), client)


def open_async_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    client = async_counting_client(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    opened = AsyncStore(AsyncRedisTokenStore(client, **options), client, loop)
    opened._run(client.ping())  # connect now, so the handshake is not counted later
    return opened


class ValkeyCountingConnection(CountingMixin, valkey.Connection):
    """A valkey-py connection that :class:`alkey.testing.RoundTrips` counts."""


class AsyncValkeyCountingConnection(AsyncCountingMixin, valkey.asyncio.Connection):
    """As :class:`ValkeyCountingConnection`, for ``valkey.asyncio``."""


def open_valkey_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    """A store on a valkey-py client: its errors must take the same way out."""
    pool = valkey.ConnectionPool.from_url(  # type: ignore[no-untyped-call]
        url,
        connection_class=ValkeyCountingConnection,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=valkey.retry.Retry(valkey.backoff.NoBackoff(), 0),
    )
    client = valkey.Valkey.from_pool(pool)
    client.ping()
    return SyncStore(RedisTokenStore(client, **options), client)  # type: ignore[arg-type]


def open_async_valkey_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    """A store on a ``valkey.asyncio`` client."""
    pool = valkey.asyncio.ConnectionPool.from_url(
        url,
        connection_class=AsyncValkeyCountingConnection,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=valkey.asyncio.retry.Retry(valkey.backoff.NoBackoff(), 0),
    )
    client = valkey.asyncio.Valkey.from_pool(pool)
    opened = AsyncStore(AsyncRedisTokenStore(client, **options), client, loop)  # type: ignore[arg-type]
    opened._run(client.ping())
    return opened


@dataclass(frozen=True)
class StoreKind:
    """A kind of store the contract runs against."""

    name: str
    #: Opens a store on a Redis URL with options (the stores' keyword arguments), using
    #: the test's event loop if it needs one.
    open: Callable[[str, asyncio.AbstractEventLoop, dict[str, Any]], StoreUnderTest]


#: Every kind of store, each of which must pass the whole store contract.
STORE_KINDS = [
    StoreKind("redis-py", open_sync_store),
    StoreKind("redis.asyncio", open_async_store),
    StoreKind("valkey-py", open_valkey_store),
    StoreKind("valkey.asyncio", open_async_valkey_store),
]


#: Opens a store of the test's kind: ``open_store(url, **options)``.
OpenStore = Callable[..., StoreUnderTest]


@pytest.fixture
def open_store(kind: StoreKind, loop: asyncio.AbstractEventLoop) -> Iterator[OpenStore]:
    """Opens stores of the test's ``kind`` (a fixture of the test's module), each on a
    client of its own; closes them after."""
    opened: list[StoreUnderTest] = []

    def open_(url: str, **options: Any) -> StoreUnderTest:
        store = kind.open(url, loop, options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
