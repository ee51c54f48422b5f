"""alkey under asyncio: the sync guarantees, without blocking the event loop.

The commit, rollback, savepoint, identifier and key semantics run for AsyncSession in
test_transactions.py, test_identity.py and test_keys.py (the ``asyncio`` flavour). This
module covers what only asyncio has: binding its session objects, the event loop staying
responsive while a commit waits for Redis, cancellation, outages through redis.asyncio,
and the default client of each event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
from sqlalchemy import Engine, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

import alkey
import alkey.asyncio
import alkey.client
import alkey.manual
import alkey.tokens
from alkey.asyncio import (
    AsyncCacheKeyGenerator,
    AsyncRedisClient,
    AsyncRedisTokenStore,
    close_async_redis_client,
    get_async_redis_client,
)
from alkey.cache import CacheKeyGenerator, get_token
from alkey.client import DEFAULT_CLIENT_OPTIONS, client_from_config, get_redis_config
from alkey.embedded import EmbeddedRedis
from alkey.testing import LatencyProxy
from alkey.tokens import CHUNK_SIZE, RedisClient

from .conftest import async_database_url, one_incident, token_keys, tokens_of
from .models import User

USER_1 = ("alkey:users#1", "alkey:users#*", alkey.GLOBAL_WRITE_TOKEN)
LATENCY = 0.05


class CountingAsyncConnection(redis.asyncio.Connection):
    """A redis.asyncio connection that counts the requests it sends (its round trips)."""

    requests = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingAsyncConnection.requests += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to slow down, pause and stop."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def slow_redis(private_redis: EmbeddedRedis) -> Iterator[LatencyProxy]:
    """The private Redis behind 50 ms of network latency per request."""
    proxy = LatencyProxy(private_redis.port, LATENCY)
    yield proxy
    proxy.close()


def run(loop: asyncio.AbstractEventLoop, scenario: Any) -> Any:
    return loop.run_until_complete(scenario)


def snapshot(client: RedisClient, identifiers: Collection[str]) -> dict[str, Any]:
    """Current tokens, creating missing ones the way a reader would."""
    for identifier in identifiers:
        get_token(client, identifier)
    return tokens_of(client, *identifiers)


async def add_user(session: AsyncSession, name: str = "ada") -> User:
    user = User(name=name)
    session.add(user)
    await session.commit()
    return user


# -- binding --------------------------------------------------------------------------------


class AppSession(Session):
    pass


class AppAsyncSession(AsyncSession):
    sync_session_class = AppSession


@pytest.mark.parametrize(
    "kind", ["async_sessionmaker", "async_scoped_session", "AsyncSession class", "instance"]
)
def test_bind_accepts_every_kind_of_asyncio_session_target_and_bumps_under_await_commit(
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
    kind: str,
) -> None:
    maker = async_sessionmaker(async_engine, class_=AppAsyncSession, expire_on_commit=False)
    targets: dict[str, Any] = {
        "async_sessionmaker": maker,
        "async_scoped_session": async_scoped_session(maker, scopefunc=asyncio.current_task),
        "AsyncSession class": AppAsyncSession,
        "instance": maker(),
    }
    target = targets[kind]
    alkey.bind(target, tokens=alkey.asyncio.store_for(async_redis_client))
    before = snapshot(redis_client, USER_1)

    async def scenario() -> None:
        session = target if kind == "instance" else maker()
        await add_user(session)
        await session.close()

    try:
        run(loop, scenario())
    finally:
        alkey.unbind(target)
    after = tokens_of(redis_client, *USER_1)
    assert {identifier for identifier in USER_1 if after[identifier] != before[identifier]} == set(
        USER_1
    )


def test_binding_an_async_sessionmaker_binds_no_other_session(
    async_engine: AsyncEngine,
    tables: Engine,
    async_redis_client: AsyncRedisClient,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    bound = async_sessionmaker(async_engine)
    other = async_sessionmaker(async_engine)
    binding = alkey.asyncio.bind(bound, redis_client=async_redis_client)
    try:
        assert alkey.asyncio.bind(bound, redis_client=async_redis_client) is binding
        assert issubclass(binding.target, Session)  # type: ignore[arg-type]
        assert binding.target is not Session, "a class of its own, not every Session"

        async def write_with_the_others() -> None:
            async with other() as session:
                await add_user(session)

        run(loop, write_with_the_others())
        with sessionmaker(tables)() as session:
            session.add(User(name="sync"))
            session.commit()
        assert redis_client.keys("alkey:*") == []
    finally:
        alkey.unbind(bound)


def test_an_async_store_used_by_a_sync_session_raises_a_clear_error_after_the_commit(
    tables: Engine, async_redis_client: AsyncRedisClient
) -> None:
    factory = sessionmaker(tables)
    alkey.bind(factory, tokens=AsyncRedisTokenStore(async_redis_client))
    try:
        with factory() as session:
            session.add(User(name="ada"))
            with pytest.raises(RuntimeError, match="outside an AsyncSession operation"):
                session.commit()
            assert session.scalars(select(User.name)).one() == "ada"
    finally:
        alkey.unbind(factory)
    gc.collect()  # an un-awaited coroutine would warn here, and fail the test


# -- the event loop keeps running -----------------------------------------------------------


async def max_gap_while(awaitable: Any) -> tuple[float, float]:
    """(the loop's longest stall, the awaitable's duration), in seconds.

    A ticker task wakes up every millisecond and records the longest time between two of
    its wake-ups: a call that blocks the loop shows as a gap as long as the block.
    """
    gaps = [0.0]
    running = True

    async def tick() -> None:
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.005)
    start = time.perf_counter()
    await awaitable
    duration = time.perf_counter() - start
    running = False
    await ticker
    return max(gaps), duration


def test_a_commit_waits_for_its_bump_without_stalling_the_event_loop(
    async_engine: AsyncEngine,
    private_redis: EmbeddedRedis,
    slow_redis: LatencyProxy,
    loop: asyncio.AbstractEventLoop,
) -> None:
    direct: RedisClient = redis.Redis(port=private_redis.port)  # no latency: the observer
    slow_async: AsyncRedisClient = redis.asyncio.Redis.from_url(slow_redis.url)
    slow_sync: RedisClient = redis.Redis.from_url(slow_redis.url)
    maker = async_sessionmaker(async_engine, expire_on_commit=False)

    async def commit_a_write() -> tuple[float, float, bool]:
        async with maker() as session:
            user = await add_user(session)
            written = (f"alkey:users#{user.id}", "alkey:users#*", alkey.GLOBAL_WRITE_TOKEN)
            before = tokens_of(direct, *written)
            user.name = "grace"
            gap, duration = await max_gap_while(session.commit())
            after = tokens_of(direct, *written)
            return gap, duration, all(after[key] != before[key] for key in written)

    try:
        alkey.asyncio.bind(maker, redis_client=slow_async)
        run(loop, slow_async.ping())  # connected, so that only the bump pays latency
        gap, duration, bumped = run(loop, commit_a_write())
        assert bumped, "the bump reached Redis before `await session.commit()` returned"
        assert duration >= LATENCY, "the commit waited for the bump's round trip"
        assert gap < LATENCY / 2, f"the loop stalled for {gap * 1000:.1f} ms"

        # The measurement sees a stall when there is one: a sync client blocks the loop.
        alkey.bind(maker, redis_client=slow_sync)
        slow_sync.ping()
        blocked_gap, _, bumped = run(loop, commit_a_write())
        assert bumped
        assert blocked_gap >= LATENCY * 0.9
    finally:
        alkey.unbind(maker)
        run(loop, slow_async.aclose())
        slow_sync.close()
        direct.close()


def test_a_bump_finishes_even_if_the_committing_task_is_cancelled(
    async_engine: AsyncEngine,
    private_redis: EmbeddedRedis,
    slow_redis: LatencyProxy,
    loop: asyncio.AbstractEventLoop,
) -> None:
    started = asyncio.Event()

    class ObservedStore(AsyncRedisTokenStore):
        """Tells the test when a bump has started (its round trip takes 50 ms)."""

        async def abump(self, identifiers: Collection[str], intent: str | None = None) -> None:
            started.set()
            await super().abump(identifiers, intent)

    direct: RedisClient = redis.Redis(port=private_redis.port)
    slow_async: AsyncRedisClient = redis.asyncio.Redis.from_url(slow_redis.url)
    store = ObservedStore(slow_async)
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.bind(maker, tokens=store)

    async def commit_then_hang_up() -> None:
        async with maker() as session:
            user = await add_user(session)
            before = tokens_of(direct, *USER_1)
            started.clear()
            user.name = "grace"
            commit = asyncio.create_task(session.commit())
            await started.wait()
            commit.cancel()  # before the bump's request is even sent
            with pytest.raises(asyncio.CancelledError):
                await commit
            deadline = time.monotonic() + 2
            while tokens_of(direct, *USER_1)["alkey:users#1"] == before["alkey:users#1"]:
                assert time.monotonic() < deadline, "the bump was lost with its task"
                await asyncio.sleep(0.01)
            after = tokens_of(direct, *USER_1)
            assert all(after[identifier] != before[identifier] for identifier in USER_1)
        async with maker() as session:
            assert (await session.scalars(select(User.name))).one() == "grace"

    try:
        run(loop, commit_then_hang_up())
    finally:
        alkey.unbind(maker)
        run(loop, slow_async.aclose())
        direct.close()


def test_concurrent_tasks_never_cancel_each_others_changes(
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.asyncio.bind(maker, redis_client=async_redis_client)
    identifiers = [f"alkey:users#{index}" for index in range(1, 9)]

    async def work(user_id: int) -> None:
        async with maker() as session:
            (await session.get_one(User, user_id)).name = "changed"
            await session.flush()
            await asyncio.sleep(0)  # let the others interleave
            # Odd-numbered tasks commit while even ones roll back.
            await (session.commit() if user_id % 2 else session.rollback())

    async def scenario() -> None:
        async with maker() as session:
            session.add_all([User(name=f"user {index}") for index in range(8)])
            await session.commit()
        before = snapshot(redis_client, identifiers)
        await asyncio.gather(*(work(index) for index in range(1, 9)))
        after = tokens_of(redis_client, *identifiers)
        assert {
            identifier for identifier in identifiers if after[identifier] != before[identifier]
        } == {f"alkey:users#{index}" for index in range(1, 9, 2)}

    try:
        run(loop, scenario())
    finally:
        alkey.unbind(maker)


# -- keys and round trips -------------------------------------------------------------------


@pytest.fixture
def counted(
    redis_url: str, redis_client: RedisClient, loop: asyncio.AbstractEventLoop
) -> Iterator[AsyncRedisClient]:
    pool = redis.asyncio.ConnectionPool.from_url(
        redis_url, connection_class=CountingAsyncConnection
    )
    client = redis.asyncio.Redis.from_pool(pool)
    run(loop, client.ping())  # connect now, so the handshake is not counted later
    yield client
    run(loop, client.aclose())


@pytest.mark.parametrize("instances", [1, 100, 2 * CHUNK_SIZE + 1])
def test_an_async_key_costs_one_round_trip_however_many_instances_it_names(
    tables: Engine, counted: AsyncRedisClient, loop: asyncio.AbstractEventLoop, instances: int
) -> None:
    with sessionmaker(tables)() as session:
        session.add_all([User(id=index, name=str(index)) for index in range(1, instances + 1)])
        session.commit()
        users = session.scalars(select(User)).all()
    key_generator = AsyncCacheKeyGenerator(counted)

    async def count(*args: object) -> tuple[str, int]:
        start = CountingAsyncConnection.requests
        key = await key_generator(*args)
        return key, CountingAsyncConnection.requests - start

    key, creating = run(loop, count(*users, "page"))
    again, reading = run(loop, count(*users, "page"))
    _, static = run(loop, count("static", 1, {"a": [1, 2]}))
    assert key == again
    assert (creating, reading, static) == (1, 1, 0)


def test_an_async_flush_costs_no_round_trip_and_a_commit_one(
    async_engine: AsyncEngine, counted: AsyncRedisClient, loop: asyncio.AbstractEventLoop
) -> None:
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.asyncio.bind(maker, redis_client=counted)

    async def scenario() -> tuple[int, int, int]:
        async with maker() as session:
            start = CountingAsyncConnection.requests
            session.add_all([User(name=str(index)) for index in range(2 * CHUNK_SIZE + 1)])
            await session.flush()
            flushed = CountingAsyncConnection.requests
            await session.commit()
            committed = CountingAsyncConnection.requests
            await session.scalars(select(User))
            await session.commit()  # read only
            return (
                flushed - start,
                committed - flushed,
                CountingAsyncConnection.requests - committed,
            )

    try:
        assert run(loop, scenario()) == (0, 1, 0)
    finally:
        alkey.unbind(maker)


def test_async_and_sync_generators_make_the_same_key_from_the_same_tokens(
    tables: Engine,
    redis_client: RedisClient,
    async_redis_client: AsyncRedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    with sessionmaker(tables, expire_on_commit=False)() as session:
        ada = User(name="ada")
        session.add(ada)
        session.commit()
    arguments = (ada, User, "alkey:tags#python", alkey.GLOBAL_WRITE_TOKEN, {"page": [1, 2]})
    sync_keys = CacheKeyGenerator(redis_client, prefix="page:")
    async_keys = AsyncCacheKeyGenerator(async_redis_client, prefix="page:")
    first = run(loop, async_keys(*arguments))  # the async generator creates the tokens
    assert sync_keys(*arguments) == first
    redis_client.delete("alkey:users#1")  # a lost token comes back as a new random value
    second = sync_keys(*arguments)
    assert second != first
    assert run(loop, async_keys(*arguments)) == second
    assert first.startswith("page:")


def test_the_sync_generator_on_an_async_store_works_inside_run_sync(
    async_engine: AsyncEngine,
    redis_client: RedisClient,
    async_redis_client: AsyncRedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Sync code that AsyncSession.run_sync() runs may build keys with the async store."""
    store = alkey.asyncio.store_for(async_redis_client)

    def in_the_greenlet(session: Session) -> str:
        return CacheKeyGenerator(tokens=store)("alkey:users#1", "page")

    async def scenario() -> str:
        async with AsyncSession(async_engine) as session:
            return await session.run_sync(in_the_greenlet)

    assert run(loop, scenario()) == CacheKeyGenerator(redis_client)("alkey:users#1", "page")


def test_an_async_generator_rejects_bad_input_as_the_sync_one_does(
    async_redis_client: AsyncRedisClient, loop: asyncio.AbstractEventLoop
) -> None:
    key_generator = AsyncCacheKeyGenerator(async_redis_client)
    with pytest.raises(ValueError, match="argument 1: 'alkey:users' is not a valid"):
        run(loop, key_generator("alkey:users"))
    with pytest.raises(ValueError, match="contains ' '"):
        AsyncCacheKeyGenerator(async_redis_client, prefix="has space")
    with pytest.raises(ValueError, match="either redis_client or tokens"):
        AsyncCacheKeyGenerator(async_redis_client, tokens=AsyncRedisTokenStore())


# -- outages --------------------------------------------------------------------------------


def quick_async_client(url: str) -> AsyncRedisClient:
    client: AsyncRedisClient = redis.asyncio.Redis.from_url(
        url, socket_timeout=0.2, socket_connect_timeout=0.2, retry=None
    )
    return client


def test_an_async_commit_during_an_outage_succeeds_and_its_bump_is_replayed_before_the_next_key(
    async_engine: AsyncEngine,
    private_redis: EmbeddedRedis,
    loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = quick_async_client(private_redis.url)
    store = AsyncRedisTokenStore(client, retry_interval=0)  # probe on every call
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.bind(maker, tokens=store)
    key_generator = AsyncCacheKeyGenerator(tokens=store)

    async def scenario() -> None:
        async with maker() as session:
            user = await add_user(session)
            key_before = await key_generator(user)

            # Stopped, then restarted from what it saved: the old tokens come back, and
            # only the kept bump can change them (a paused server would still run the
            # bump that timed out, once resumed).
            await client.save()
            private_redis.stop()
            with caplog.at_level(logging.INFO, logger="alkey"):
                user.name = "grace"
                await session.commit()  # must not raise
                outage_keys = {await key_generator(user) for _ in range(3)}
                assert store.pending == set(USER_1)
                assert key_before not in outage_keys, "during the outage every key is a miss"
                assert len(outage_keys) == 3
                private_redis.start()
                await key_generator(user)  # carries the kept bumps in front
                assert store.pending == frozenset()
            # Misses go on for the recovery window: other processes may still owe bumps.
            await asyncio.sleep(store.outage.recovery_window)
            key_after = await key_generator(user)
            assert await key_generator(user) == key_after, "keys are stable again"
            assert key_after != key_before, "and the bump kept during the outage was not lost"
        async with maker() as session:
            assert (await session.scalars(select(User.name))).one() == "grace"

    try:
        run(loop, scenario())
    finally:
        alkey.unbind(maker)
        run(loop, client.aclose())
    one_incident(caplog, "3 bump(s) kept for replay", "replayed 3 bump(s)")


def test_awaiting_wait_replayed_sends_the_bumps_kept_during_an_outage_before_shutdown(
    private_redis: EmbeddedRedis, loop: asyncio.AbstractEventLoop
) -> None:
    """The replay task ends with its event loop, so an application awaits
    ``wait_replayed`` in its shutdown; it returns once the kept bumps reached Redis."""
    observer: RedisClient = redis.Redis.from_url(private_redis.url, socket_timeout=2)
    client = quick_async_client(private_redis.url)
    store = AsyncRedisTokenStore(client, retry_interval=0.05)

    async def scenario() -> str:
        [before] = await store.afetch(["alkey:users#1"])
        private_redis.pause()
        try:
            await store.abump(["alkey:users#1"])  # must not raise
            assert store.pending == {"alkey:users#1"}
            assert not await store.wait_replayed(timeout=0.3), "not while Redis is frozen"
        finally:
            private_redis.resume()
        assert await store.wait_replayed(timeout=5)
        return before

    try:
        before = run(loop, scenario())
        assert observer.get("alkey:users#1") not in (None, before.encode())
    finally:
        run(loop, client.aclose())
        observer.close()


def test_async_key_generation_with_redis_stopped_returns_misses_quickly(
    private_redis: EmbeddedRedis, loop: asyncio.AbstractEventLoop
) -> None:
    client = quick_async_client(private_redis.url)
    key_generator = AsyncCacheKeyGenerator(tokens=AsyncRedisTokenStore(client))

    async def scenario() -> None:
        key = await key_generator("alkey:users#1")
        private_redis.stop()
        start = time.perf_counter()
        missed = [await key_generator("alkey:users#1") for _ in range(3)]
        assert time.perf_counter() - start < 1
        assert key not in missed
        assert len(set(missed)) == 3

    try:
        run(loop, scenario())
    finally:
        run(loop, client.aclose())


def test_the_raise_policy_lets_redis_errors_through_after_the_async_database_commit(
    async_engine: AsyncEngine, private_redis: EmbeddedRedis, loop: asyncio.AbstractEventLoop
) -> None:
    client = quick_async_client(private_redis.url)
    store = AsyncRedisTokenStore(client, on_error="raise")
    maker = async_sessionmaker(async_engine)
    alkey.bind(maker, tokens=store)

    async def scenario() -> None:
        private_redis.stop()
        with pytest.raises(redis.ConnectionError):
            await AsyncCacheKeyGenerator(tokens=store)("alkey:users#1")
        async with maker() as session:
            session.add(User(name="ada"))
            with pytest.raises(redis.ConnectionError):
                await session.commit()
            assert session.get_transaction() is None, "the session is clean after the error"
            assert (await session.scalars(select(User.name))).one() == "ada"

    try:
        run(loop, scenario())
    finally:
        alkey.unbind(maker)
        run(loop, client.aclose())


# -- the default client of each event loop --------------------------------------------------


def connections(client: RedisClient, db: int) -> int:
    """How many clients are connected to database ``db`` of the server."""
    return sum(1 for entry in client.client_list() if int(entry["db"]) == db)


def wait_for_connections(client: RedisClient, db: int, expected: int) -> None:
    deadline = time.monotonic() + 2
    while connections(client, db) != expected:
        assert time.monotonic() < deadline, f"{connections(client, db)} != {expected}"
        time.sleep(0.01)


def test_each_event_loop_gets_a_default_client_configured_like_the_sync_one_and_closed_with_it(
    redis_url: str, redis_client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_DB", "3")
    monkeypatch.setenv("REDIS_MAX_CONNECTIONS", "7")
    sync_client = client_from_config(get_redis_config())
    sync_pool = sync_client.connection_pool
    seen: list[AsyncRedisClient] = []

    async def use_the_default_client() -> None:
        client = await get_async_redis_client()
        assert await get_async_redis_client() is client, "one per loop"
        pool = client.connection_pool
        for option in (*DEFAULT_CLIENT_OPTIONS, "db", "host", "port"):
            assert pool.connection_kwargs[option] == sync_pool.connection_kwargs[option]
        assert pool.max_connections == sync_pool.max_connections == 7
        await client.ping()
        assert connections(redis_client, 3) == 1
        seen.append(client)

    for _ in range(3):  # three loops, one after the other, as asyncio.run makes them
        asyncio.run(use_the_default_client())
        wait_for_connections(redis_client, 3, 0)  # closed when its loop shut down
    assert len({id(client) for client in seen}) == 3
    seen.clear()
    gc.collect()  # an unclosed connection would warn here, and fail the test
    sync_client.close()


def test_the_default_client_can_be_closed_before_its_loop_ends(
    redis_url: str, redis_client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_DB", "4")

    async def scenario() -> None:
        client = await get_async_redis_client()
        await client.ping()
        await close_async_redis_client()
        await asyncio.to_thread(wait_for_connections, redis_client, 4, 0)
        replacement = await get_async_redis_client()
        assert replacement is not client
        await replacement.ping()

    asyncio.run(scenario())
    wait_for_connections(redis_client, 4, 0)


def test_bind_without_a_client_bumps_through_each_loops_default_client(
    tables: Engine, redis_url: str, redis_client: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    maker = async_sessionmaker(expire_on_commit=False)
    binding = alkey.asyncio.bind(maker)
    key_generator = AsyncCacheKeyGenerator()
    assert binding.tokens is alkey.asyncio.store_for()
    assert key_generator.tokens is alkey.asyncio.store_for()

    async def write(name: str) -> str:
        # A database connection, like a Redis one, belongs to the loop that opened it.
        engine = create_async_engine(async_database_url(tables.url))
        try:
            async with maker(bind=engine) as session:
                user = await add_user(session, name)
                return await key_generator(user)
        finally:
            await engine.dispose()

    try:
        keys = [asyncio.run(write(name)) for name in ("ada", "bob")]  # two loops
    finally:
        alkey.unbind(maker)
    assert keys[0] != keys[1]
    assert {"alkey:users#1", "alkey:users#2"} <= token_keys(redis_client)


def test_ainvalidate_bumps_in_the_store_of_an_asyncio_binding_with_its_own_prefix(
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    store = AsyncRedisTokenStore(async_redis_client, key_prefix="tenant1:")
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.asyncio.bind(maker, tokens=store)

    async def scenario() -> list[list[str]]:
        seen = [await store.afetch(["alkey:users#1"])]
        await alkey.asyncio.ainvalidate("alkey:users#1")  # every bound store
        seen.append(await store.afetch(["alkey:users#1"]))
        async with maker() as session:
            await alkey.asyncio.ainvalidate("alkey:users#1", session=session)
        seen.append(await store.afetch(["alkey:users#1"]))
        await alkey.asyncio.ainvalidate("alkey:users#1", tokens=store)
        seen.append(await store.afetch(["alkey:users#1"]))
        return seen

    try:
        seen = run(loop, scenario())
    finally:
        alkey.unbind(maker)
    assert len({tuple(tokens) for tokens in seen}) == 4, "each call bumped the token"
    assert redis_client.exists("tenant1:alkey:users#1")
    assert not redis_client.exists("alkey:users#1"), "nothing went to the default prefix"


def test_ainvalidate_runs_a_sync_stores_bump_off_the_loop_and_without_bindings_uses_the_default(
    redis_url: str,
    redis_client: RedisClient,
    loop: asyncio.AbstractEventLoop,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)

    class Recording(alkey.tokens.RedisTokenStore):
        """A real store that notes which thread each bump ran in."""

        threads: ClassVar[list[threading.Thread]] = []

        def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
            self.threads.append(threading.current_thread())
            super().bump(identifiers, intent)

    sync_store = Recording(redis_client, key_prefix="sync:")
    before = sync_store.fetch(["alkey:users#2"])
    run(loop, alkey.asyncio.ainvalidate("alkey:users#2", tokens=sync_store))
    assert sync_store.fetch(["alkey:users#2"]) != before
    [thread] = sync_store.threads
    assert thread is not threading.main_thread(), "the bump ran off the loop's thread"

    async def default() -> tuple[list[str], list[str]]:
        default_store = alkey.asyncio.store_for()
        first = await default_store.afetch(["alkey:users#3"])
        await alkey.asyncio.ainvalidate("alkey:users#3")
        return first, await default_store.afetch(["alkey:users#3"])

    first, second = run(loop, default())
    assert first != second


def test_sync_invalidate_says_once_that_it_cannot_bump_in_an_asyncio_bindings_store(
    async_engine: AsyncEngine,
    async_redis_client: AsyncRedisClient,
    redis_url: str,
    redis_client: RedisClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(alkey.manual, "_warned_awaited_only", False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setattr(alkey.client, "_default_configuration", None)
    default = alkey.client.default_store()
    before = default.fetch(["alkey:users#4"])
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.asyncio.bind(maker, tokens=AsyncRedisTokenStore(async_redis_client, key_prefix="a:"))
    try:
        with caplog.at_level(logging.WARNING, logger="alkey.manual"):
            alkey.invalidate("alkey:users#4")
            alkey.invalidate("alkey:users#4")
    finally:
        alkey.unbind(maker)
    [line] = [record.getMessage() for record in caplog.records if record.name == "alkey.manual"]
    assert "await alkey.asyncio.ainvalidate" in line
    assert default.fetch(["alkey:users#4"]) != before, "the default store was bumped instead"
    assert not redis_client.exists("a:alkey:users#4"), "the asyncio binding's store was not"


def test_ainvalidate_refuses_both_tokens_and_session_naming_itself(
    async_redis_client: AsyncRedisClient, loop: asyncio.AbstractEventLoop
) -> None:
    store = AsyncRedisTokenStore(async_redis_client)
    with pytest.raises(ValueError, match=r"alkey\.asyncio\.ainvalidate\(\): pass either"):
        run(loop, alkey.asyncio.ainvalidate("alkey:users#5", tokens=store, session=Session()))
    with pytest.raises(ValueError, match=r"alkey\.asyncio\.ainvalidate\(session=\.\.\.\) needs"):
        run(loop, alkey.asyncio.ainvalidate("alkey:users#5", session=Session()))
