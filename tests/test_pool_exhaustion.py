"""An exhausted connection pool is not a Redis outage.

With ``max_connections`` (``REDIS_MAX_CONNECTIONS``), a thread or task finds the pool
empty whenever more of them than that talk to Redis at once; redis-py raises
``MaxConnectionsError``. Redis answers everyone else, so a store must not turn the cache
off for every caller: a call waits for a connection (at most the client's socket
timeout), and only a call still without one then goes without Redis, alone: its fetch
misses, its bump is kept and replayed by the next call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import redis
import redis.asyncio

from alkey.asyncio import AsyncRedisTokenStore
from alkey.errors import TokenStorePoolExhaustedError
from alkey.tokens import RedisClient, RedisTokenStore

from .support.inspection import stored
from .support.pools import is_pool_exhausted, take_connection

THREADS = 16
ROUNDS = 40


class CountingPool(redis.ConnectionPool):
    """A real pool that counts the connections it refused: the proof that the threads
    really found it exhausted."""

    refused = 0

    def get_connection(self, *args: Any, **options: Any) -> Any:
        try:
            return super().get_connection(*args, **options)
        except redis.ConnectionError as error:
            self.refused += is_pool_exhausted(error)
            raise


class AsyncCountingPool(redis.asyncio.ConnectionPool):
    refused = 0

    async def get_connection(self, *args: Any, **options: Any) -> Any:
        try:
            return await super().get_connection(*args, **options)  # type: ignore[no-untyped-call]
        except redis.ConnectionError as error:
            self.refused += is_pool_exhausted(error)
            raise


def test_threads_beyond_max_connections_keep_getting_real_tokens_and_lose_no_bump(
    redis_url: str, redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    pool = CountingPool.from_url(redis_url, max_connections=2, socket_timeout=2)
    store = RedisTokenStore(redis.Redis(connection_pool=pool))
    first = {n: store.fetch([f"alkey:users#{n}"])[0] for n in range(THREADS)}
    [shared] = store.fetch(["alkey:users#*"])
    problems: list[str] = []
    start = threading.Barrier(THREADS)

    def work(n: int) -> None:
        own = f"alkey:users#{n}"
        start.wait()
        for _ in range(ROUNDS):
            before, read = store.fetch([own, "alkey:users#*"])
            if read != shared:
                problems.append(f"a read-only token came back as {read!r}")
            store.bump([own])
            [after] = store.fetch([own])  # only this thread bumps it: Redis holds this
            if after == before or stored(after) != redis_client.get(own):
                problems.append(f"thread {n}: {before!r} -> {after!r}")

    with caplog.at_level(logging.INFO, logger="alkey"):
        threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert pool.refused > 0, "the pool was exhausted"
    assert problems == []
    assert not store.pending
    assert not store.outage.skip()
    for n, token in first.items():
        assert redis_client.get(f"alkey:users#{n}") != stored(token), "no bump lost"
    assert caplog.records == [], "waiting for a connection is no incident"
    pool.disconnect()


def test_a_call_that_gets_no_connection_in_time_goes_without_redis_alone(
    redis_url: str, redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The application holds the only connection for longer than the socket timeout: that
    call misses and keeps its bump, and nothing is marked down -- the next call, with a
    connection, gets Redis's token at once (no recovery window) and replays the bump."""
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=1, socket_timeout=0.2)
    store = RedisTokenStore(redis.Redis(connection_pool=pool), retry_interval=60)
    [ada] = store.fetch(["alkey:users#1"])
    [grace] = store.fetch(["alkey:users#2"])
    held = take_connection(pool)
    with caplog.at_level(logging.INFO, logger="alkey"):
        [missed] = store.fetch(["alkey:users#1"])
        store.bump(["alkey:users#2"])
        assert missed != ada, "a miss"
        assert store.pending == {"alkey:users#2"}, "kept for replay"
        assert not store.outage.skip(), "Redis is not marked down"
        pool.release(held)
        assert store.fetch(["alkey:users#1", "alkey:users#2"])[0] == ada, "a hit at once"
    assert not store.pending
    assert redis_client.get("alkey:users#2") != stored(grace), "the bump was replayed"
    down, again = (record.getMessage() for record in caplog.records)
    assert "Too many connections" in down
    assert "not marked down" in down
    assert "Redis unavailable" not in down
    assert "2 call(s) went without" in again
    pool.disconnect()


def test_a_call_that_gets_no_connection_in_time_raises_under_the_raise_policy(
    redis_url: str,
) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=1, socket_timeout=0.1)
    store = RedisTokenStore(redis.Redis(connection_pool=pool), on_error="raise")
    held = take_connection(pool)
    with pytest.raises(TokenStorePoolExhaustedError) as raised:
        store.fetch(["alkey:users#1"])
    assert is_pool_exhausted(raised.value.__cause__)
    pool.release(held)
    assert len(store.fetch(["alkey:users#1"])) == 1
    pool.disconnect()


def test_tasks_beyond_max_connections_keep_getting_real_tokens_and_lose_no_bump(
    redis_url: str,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = AsyncCountingPool.from_url(redis_url, max_connections=2, socket_timeout=2)
    client = redis.asyncio.Redis.from_pool(pool)
    store = AsyncRedisTokenStore(client)
    problems: list[str] = []

    async def work(n: int, shared: str) -> None:
        own = f"alkey:users#{n}"
        for _ in range(ROUNDS):
            before, read = await store.afetch([own, "alkey:users#*"])
            if read != shared:
                problems.append(f"a read-only token came back as {read!r}")
            await store.abump([own])
            [after] = await store.afetch([own])
            if after == before or stored(after) != redis_client.get(own):
                problems.append(f"task {n}: {before!r} -> {after!r}")

    async def run() -> dict[int, str]:
        first = {n: (await store.afetch([f"alkey:users#{n}"]))[0] for n in range(THREADS)}
        [shared] = await store.afetch(["alkey:users#*"])
        await asyncio.gather(*(work(n, shared) for n in range(THREADS)))
        await client.aclose()
        return first

    with caplog.at_level(logging.INFO, logger="alkey"):
        first = loop.run_until_complete(run())
    assert pool.refused > 0, "the pool was exhausted"
    assert problems == []
    assert not store.pending
    assert not store.outage.skip()
    for n, token in first.items():
        assert redis_client.get(f"alkey:users#{n}") != stored(token), "no bump lost"
    assert caplog.records == []


def test_a_blocking_pool_that_times_out_is_no_outage_either(
    redis_url: str, redis_client: RedisClient, caplog: pytest.LogCaptureFixture
) -> None:
    """redis-py's BlockingConnectionPool waits its own timeout, then raises a plain
    ConnectionError: still an exhausted pool, not a Redis that stopped answering."""
    pool = redis.BlockingConnectionPool.from_url(
        redis_url, max_connections=1, timeout=0.1, socket_timeout=2
    )
    store = RedisTokenStore(redis.Redis(connection_pool=pool), retry_interval=60)
    [ada] = store.fetch(["alkey:users#1"])
    held = take_connection(pool)
    with caplog.at_level(logging.INFO, logger="alkey"):
        [missed] = store.fetch(["alkey:users#1"])
        assert missed != ada
        assert not store.outage.skip()
        pool.release(held)  # type: ignore[no-untyped-call]
        assert store.fetch(["alkey:users#1"]) == [ada]
    assert len(caplog.records) == 2
    assert "Redis unavailable" not in caplog.records[0].getMessage()
    pool.disconnect()
