"""The local token cache (``local_cache=N``): warm keys cost no round trip, and no token
is served once Redis said it changed, or once the cache cannot know.

Every test runs against a redis-server of its own (:class:`alkey.embedded.EmbeddedRedis`),
so that it can flush, kill connections of, pause, stop and restart it. Round trips are
counted on the connections of the store's own pool (the tracking connection, made outside
the pool, is not counted: its pings are not the application's round trips), and checked
on the server's own command counts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from redis._parsers import _RESP2Parser
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey import localcache
from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis
from alkey.errors import ConfigurationError
from alkey.localcache import LEASE, LocalTokens
from alkey.observers import StoreObserver
from alkey.settings import configure
from alkey.tokens import RedisClient, RedisTokenStore

from .support.inspection import command_calls, stored
from .support.replication import wait_until

_T = TypeVar("_T")

#: Seconds between the listener's reconnection attempts (and the store's Redis probes).
RETRY_INTERVAL = 0.05
#: Seconds a store's client waits for Redis.
SOCKET_TIMEOUT = 0.5
#: Seconds any asynchronous effect (a message, a reconnection) gets to show.
DEADLINE = 5.0

ROWS = [f"alkey:users#{row}" for row in range(10)]


# -- round trips, counted on the store's own pool --------------------------------------------


class CountedConnection(redis.Connection):
    """A redis-py connection that counts the requests it sends (its round trips)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)  # type: ignore[no-untyped-call]
        self.requests = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.requests += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class CountedPool(redis.ConnectionPool):
    """A pool that remembers the connections it made: its requests are the store's round
    trips. The tracking connection is made with the pool's class but outside it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.made: list[CountedConnection] = []

    def make_connection(self) -> Any:
        connection = super().make_connection()
        assert isinstance(connection, CountedConnection)
        self.made.append(connection)
        return connection

    def requests(self) -> int:
        return sum(connection.requests for connection in self.made)


class CountedAsyncConnection(redis.asyncio.Connection):
    """A ``redis.asyncio`` connection that counts the requests it sends."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.requests = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.requests += 1
        await super().send_packed_command(command, check_health)


class CountedAsyncPool(redis.asyncio.ConnectionPool):
    """:class:`CountedPool` for ``redis.asyncio``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.made: list[CountedAsyncConnection] = []

    def make_connection(self) -> Any:
        connection = super().make_connection()  # type: ignore[no-untyped-call]
        assert isinstance(connection, CountedAsyncConnection)
        self.made.append(connection)
        return connection

    def requests(self) -> int:
        return sum(connection.requests for connection in self.made)


def script_calls(admin: RedisClient) -> int:
    """How many scripts the server has run: every fetch or bump of every store."""
    return command_calls(admin, "evalsha") + command_calls(admin, "eval")


# -- observers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invalidation:
    count: int
    evicted: int
    #: The thread that reported it: the listener's, or the one that bumped.
    thread: int


@dataclass
class Recorder(StoreObserver):
    """The local cache's events, as they come, from any thread."""

    lookups: list[tuple[int, int]] = field(default_factory=list)
    invalidations: list[Invalidation] = field(default_factory=list)
    flushes: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def local_lookup(self, *, hits: int, misses: int) -> None:
        with self.lock:
            self.lookups.append((hits, misses))

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        with self.lock:
            self.invalidations.append(Invalidation(count, evicted, threading.get_ident()))

    def local_flushed(self, *, reason: str, entries: int) -> None:
        with self.lock:
            self.flushes.append((reason, entries))

    def flushed_because(self, words: str) -> tuple[str, int] | None:
        """The first flush whose reason contains ``words``, if any."""
        with self.lock:
            return next((flush for flush in self.flushes if words in flush[0]), None)


# -- stores ----------------------------------------------------------------------------------


@dataclass
class Cached:
    """A sync store with the local cache on, on a client of its own."""

    store: RedisTokenStore
    pool: CountedPool
    events: Recorder

    @property
    def local(self) -> LocalTokens:
        local = self.store.local
        assert local is not None
        return local

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return self.store.fetch(identifiers)

    def counted(self, call: Callable[[], _T]) -> tuple[_T, int]:
        """What ``call`` returned, and how many round trips it made."""
        before = self.pool.requests()
        result = call()
        return result, self.pool.requests() - before

    def served(self, identifiers: Sequence[str]) -> tuple[list[str], bool]:
        """A fetch's tokens, and whether the cache answered it whole: no round trip, every
        identifier a hit. (No round trip alone could be a forced miss in an outage.)"""
        hits = self.local.hits
        tokens, trips = self.counted(lambda: self.fetch(identifiers))
        return tokens, trips == 0 and self.local.hits - hits == len(identifiers)

    def warm(self, identifiers: Sequence[str]) -> list[str]:
        """The tokens of ``identifiers`` once the cache is live and holds them all. (A
        fetch that created a token may keep nothing: Redis announces the token it created,
        which spoils that fetch.)"""

        def warmed() -> list[str] | None:
            tokens, cached = self.served(identifiers)  # starts the listener if need be
            return tokens if cached else None

        return wait_until(warmed, DEADLINE, f"{len(identifiers)} token(s) to be cached", 0.005)


def counted_client(
    url: str, socket_timeout: float = SOCKET_TIMEOUT, **options: Any
) -> tuple[RedisClient, CountedPool]:
    pool = CountedPool.from_url(
        url,
        connection_class=CountedConnection,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    return redis.Redis.from_pool(pool), pool


OpenCached = Callable[..., Cached]


@pytest.fixture
def server() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to flush, pause, stop and restart."""
    with EmbeddedRedis() as private:
        yield private


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[RedisClient]:
    """Another client of the test's Redis: what other processes do to it."""
    client: RedisClient = redis.Redis.from_url(server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def other(admin: RedisClient) -> RedisTokenStore:
    """A store without a local cache, as in another process: its bumps are announced."""
    return RedisTokenStore(admin)


@pytest.fixture
def open_cached(server: EmbeddedRedis) -> Iterator[OpenCached]:
    """Opens stores with the local cache on; closes their caches and clients after."""
    opened: list[tuple[Cached, RedisClient]] = []

    def open_(
        *,
        local_cache: int = 1000,
        socket_timeout: float = SOCKET_TIMEOUT,
        client_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> Cached:
        client, pool = counted_client(server.url, socket_timeout, **(client_options or {}))
        events = Recorder()
        options.setdefault("retry_interval", RETRY_INTERVAL)
        store = RedisTokenStore(client, local_cache=local_cache, observers=[events], **options)
        cached = Cached(store, pool, events)
        opened.append((cached, client))
        return cached

    yield open_
    for cached, client in opened:
        cached.store.close_local_cache()
        client.close()


@pytest.fixture
def rows(other: RedisTokenStore) -> list[str]:
    """:data:`ROWS`, their tokens created before any cached store listens: no message
    about their creation can reach a cache later and evict what a test warmed."""
    other.fetch(ROWS)
    return ROWS


def tracking_clients(admin: RedisClient) -> list[dict[str, Any]]:
    """The server's tracking connections (CLIENT LIST flag ``t``)."""
    return [client for client in admin.client_list() if "t" in client["flags"]]


def listener_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "alkey-invalidations"}


# -- warm keys -------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_a_warm_key_costs_no_round_trip_and_answers_the_tokens_redis_holds(
    open_cached: OpenCached, admin: RedisClient
) -> None:
    cached = open_cached()
    tokens = cached.warm(ROWS)
    scripts = script_calls(admin)
    hits = cached.local.stats().hits

    answers, trips = cached.counted(lambda: [cached.fetch(ROWS) for _ in range(200)])

    assert trips == 0
    assert script_calls(admin) == scripts, "the server ran no fetch either"
    assert all(answer == tokens for answer in answers)
    assert [stored(token) for token in tokens] == admin.mget(ROWS)
    assert cached.local.stats().hits - hits == 200 * len(ROWS)


@pytest.mark.usefixtures("rows")
def test_the_cache_works_with_redis_pys_pure_python_parser_as_without_hiredis(
    open_cached: OpenCached, other: RedisTokenStore
) -> None:
    """Without hiredis, redis-py 8 refuses a RESP2 connection configured for its
    maintenance notifications (RESP3 only); the tracking connection is RESP2, so it must
    leave them out, or the cache never serves (and ``alkey watch`` cannot connect)."""
    cached = open_cached(client_options={"parser_class": _RESP2Parser})
    tokens = cached.warm(ROWS)
    other.bump([ROWS[0]])

    def changed_here() -> list[str] | None:
        answer = cached.fetch(ROWS)
        return answer if answer[0] != tokens[0] else None

    changed = wait_until(changed_here, DEADLINE, "the bump to reach the cache", 0.005)
    assert changed[1:] == tokens[1:]


@pytest.mark.usefixtures("rows")
def test_a_bump_by_another_process_changes_only_that_token_here_within_a_moment(
    open_cached: OpenCached, admin: RedisClient, server: EmbeddedRedis
) -> None:
    cached = open_cached()
    tokens = cached.warm(ROWS)
    bump = (
        "import sys, redis\n"
        "from alkey.tokens import RedisTokenStore\n"
        "client = redis.Redis.from_url(sys.argv[1])\n"
        "RedisTokenStore(client).bump(sys.argv[2:])\n"
        "client.close()\n"
    )
    subprocess.run([sys.executable, "-c", bump, server.url, ROWS[3]], check=True, timeout=60)
    bumped_at = time.monotonic()

    def changed_here() -> list[str] | None:
        answer = cached.fetch(ROWS)
        return answer if answer[3] != tokens[3] else None

    changed = wait_until(
        changed_here,
        2.0,
        "the other process's bump to reach this cache",
        0.001,
    )

    assert time.monotonic() - bumped_at < 2.0
    assert stored(changed[3]) == admin.get(ROWS[3]), "the new token is Redis's"
    assert changed[:3] + changed[4:] == tokens[:3] + tokens[4:], "the others still hit"
    assert cached.local.stats().invalidations == 1
    assert cached.events.invalidations[0].evicted == 1


@pytest.mark.usefixtures("rows")
def test_the_processs_own_bump_is_read_back_at_once(
    open_cached: OpenCached, admin: RedisClient
) -> None:
    cached = open_cached()
    tokens = cached.warm(ROWS)
    main = threading.get_ident()

    cached.store.bump([ROWS[0]])
    after = cached.fetch(ROWS)  # no sleep, no wait for Redis's message

    assert after[0] != tokens[0]
    assert stored(after[0]) == admin.get(ROWS[0])
    assert after[1:] == tokens[1:]
    assert any(
        event.thread == main and event.count == 1 for event in cached.events.invalidations
    ), "the bump itself evicted the token, in the bumping thread"


def test_an_invalidation_arriving_while_a_cold_fetch_is_in_flight_keeps_its_result_out(
    open_cached: OpenCached,
    admin: RedisClient,
    other: RedisTokenStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    racing, warming = "alkey:users#1", "alkey:users#2"
    [before] = other.fetch([racing])  # exists before this store listens: no message pending
    other.fetch([warming])
    cached = open_cached()
    cached.warm([warming])
    run = cached.store.transport.run
    raced: list[bool] = []

    def run_then_race(calls: Any) -> list[Any]:
        """The real round trip; then, before the store sees its results, another process
        bumps the token and this cache hears of it."""
        results = run(calls)
        if not raced:
            raced.append(True)
            heard = len(cached.events.invalidations)
            other.bump([racing])
            wait_until(
                lambda: len(cached.events.invalidations) > heard,
                DEADLINE,
                "the bump's invalidation",
                0.001,
            )
        return results

    monkeypatch.setattr(cached.store.transport, "run", run_then_race)

    [old] = cached.fetch([racing])
    assert stored(old) == stored(before), "the fetch read Redis before the bump"
    last = cached.events.invalidations[-1]
    assert (last.count, last.evicted) == (1, 0), "heard while in flight, nothing to evict"

    [new], trips = cached.counted(lambda: cached.fetch([racing]))
    assert trips == 1, "the raced result was not cached"
    assert new != old
    assert stored(new) == admin.get(racing)
    [again], trips = cached.counted(lambda: cached.fetch([racing]))
    assert (again, trips) == (new, 0), "an undisturbed fetch is cached"


# -- when the cache cannot know --------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_a_killed_tracking_connection_empties_the_cache_which_comes_back_without_stale_tokens(
    open_cached: OpenCached, admin: RedisClient, other: RedisTokenStore
) -> None:
    # A slow reconnection, so that a bump lands while no tracking connection exists.
    cached = open_cached(retry_interval=0.5)
    tokens = cached.warm(ROWS)
    [tracking] = tracking_clients(admin)

    assert admin.client_kill_filter(_type="pubsub") == 1
    other.bump([ROWS[0]])  # never announced to this process
    flushed = wait_until(
        lambda: cached.events.flushed_because("lost"),
        DEADLINE,
        "the cache to be emptied",
        0.001,
    )
    assert flushed[1] == len(ROWS)
    assert not cached.local.live
    assert cached.local.stats().entries == 0

    during, trips = cached.counted(lambda: cached.fetch(ROWS))
    assert trips == 1, "a cold round trip"
    assert stored(during[0]) == admin.get(ROWS[0]) != stored(tokens[0])
    assert during[1:] == tokens[1:]

    wait_until(lambda: cached.local.live, DEADLINE, "the listener to reconnect")
    after = cached.warm(ROWS)
    assert after == during, "no token from before the kill comes back"
    [new_tracking] = tracking_clients(admin)
    assert new_tracking["id"] != tracking["id"]


@pytest.mark.usefixtures("rows")
def test_flushall_empties_the_cache(open_cached: OpenCached, admin: RedisClient) -> None:
    cached = open_cached()
    tokens = cached.warm(ROWS)

    admin.flushall()
    flushed = wait_until(
        lambda: cached.events.flushed_because("flushed its data"),
        DEADLINE,
        "the FLUSHALL's invalidation",
        0.001,
    )
    assert flushed[1] == len(ROWS)

    fresh, trips = cached.counted(lambda: cached.fetch(ROWS))
    assert trips == 1
    assert set(fresh).isdisjoint(tokens)
    assert [stored(token) for token in fresh] == admin.mget(ROWS)


@pytest.mark.usefixtures("rows")
def test_a_restarted_redis_serves_no_token_from_before_and_the_cache_comes_back(
    open_cached: OpenCached, admin: RedisClient, server: EmbeddedRedis
) -> None:
    cached = open_cached()
    tokens = cached.warm(ROWS)

    server.stop()
    wait_until(lambda: not cached.local.live, DEADLINE, "the cache to stop serving")
    answers = [cached.fetch(ROWS)]
    server.start()  # same port, its data lost
    deadline = time.monotonic() + DEADLINE
    while True:
        answer, from_cache = cached.served(ROWS)
        answers.append(answer)
        if from_cache:
            break
        assert time.monotonic() < deadline, "the cache did not come back"
        time.sleep(0.005)

    for answer in answers:
        assert set(answer).isdisjoint(tokens), "no token from before the restart"
    assert cached.local.live
    assert [stored(token) for token in answers[-1]] == admin.mget(ROWS)


@pytest.mark.usefixtures("rows")
def test_a_hung_redis_stops_the_hits_within_the_lease(
    open_cached: OpenCached, server: EmbeddedRedis
) -> None:
    cached = open_cached(socket_timeout=0.2)
    tokens = cached.warm(ROWS)
    assert server.pid is not None
    answers: list[tuple[float, list[str]]] = []

    paused_at = time.monotonic()
    os.kill(server.pid, signal.SIGSTOP)
    try:
        while time.monotonic() - paused_at < LEASE + 0.6:
            started = time.monotonic() - paused_at
            answers.append((started, cached.fetch(ROWS)))
            time.sleep(0.01)
        live = cached.local.live
    finally:
        os.kill(server.pid, signal.SIGCONT)

    assert not live
    served = [started for started, answer in answers if answer == tokens]
    cold = [started for started, answer in answers if set(answer).isdisjoint(tokens)]
    assert len(served) + len(cold) == len(answers), "all from the cache, or none"
    assert served, "within the lease the cache serves"
    assert max(served) <= LEASE + 0.1, "nothing cached is served after the lease"
    assert cold
    assert min(cold) <= LEASE + 0.1
    assert all(started > max(served) for started in cold), "once stopped, it stays stopped"
    # Resumed: the tokens are still Redis's, and the cache serves them again.
    assert cached.warm(ROWS) == tokens


def test_a_fetch_that_sees_another_replication_id_empties_the_cache() -> None:
    with EmbeddedRedis(extra_args=("--enable-debug-command", "yes")) as server:
        admin: RedisClient = redis.Redis.from_url(server.url, socket_timeout=5)
        client, pool = counted_client(server.url)
        events = Recorder()
        store = RedisTokenStore(
            client, local_cache=1000, retry_interval=RETRY_INTERVAL, observers=[events]
        )
        cached = Cached(store, pool, events)
        try:
            RedisTokenStore(admin).fetch([*ROWS, "alkey:users#cold"])
            tokens = cached.warm(ROWS)

            # A new replication id, as a failover or a restart gives; no connection drops.
            admin.execute_command("DEBUG", "CHANGE-REPL-ID")  # type: ignore[no-untyped-call]
            cached.fetch(["alkey:users#cold"])  # a cold fetch answered under the new id
            assert not cached.local.live, "it stops serving at once"
            assert [entries for _, entries in events.flushes] == [len(ROWS)]
            assert cached.local.stats().entries == 0

            after, trips = cached.counted(lambda: cached.fetch(ROWS))
            assert trips == 1
            assert set(after).isdisjoint(tokens), "every key changes with the epoch"
            assert [stored(token) for token in after] == [stored(token) for token in tokens]
            assert cached.warm(ROWS) == after, "and the cache comes back"
        finally:
            store.close_local_cache()
            client.close()
            admin.close()


class Stall(Recorder):
    """Holds the listener thread up inside an invalidation, while :attr:`armed`: what a
    slow observer, a long GC pause or a frozen process does to it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.inside = threading.Semaphore(0)
        self.resume = threading.Semaphore(0)

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        super().local_invalidated(count=count, evicted=evicted)
        if self.armed and threading.current_thread().name == "alkey-invalidations":
            self.inside.release()
            self.resume.acquire(timeout=DEADLINE * 2)

    def stalled(self) -> None:
        """Wait until the listener is held up inside an invalidation."""
        assert self.inside.acquire(timeout=DEADLINE), "the listener did not stall"

    def release(self) -> None:
        self.armed = False
        self.resume.release()
        self.resume.release()


@pytest.fixture
def stalled_store(server: EmbeddedRedis, other: RedisTokenStore) -> Iterator[tuple[Cached, Stall]]:
    """A store whose listener the test can hold up, with :data:`ROWS` warm in its cache."""
    other.fetch(ROWS)
    client, pool = counted_client(server.url)
    stall = Stall()
    store = RedisTokenStore(
        client, local_cache=1000, retry_interval=RETRY_INTERVAL, observers=[stall]
    )
    cached = Cached(store, pool, stall)
    try:
        yield cached, stall
    finally:
        stall.release()
        store.close_local_cache()
        client.close()


def test_a_stalled_listener_stops_the_hits_within_the_lease(
    stalled_store: tuple[Cached, Stall], other: RedisTokenStore, admin: RedisClient
) -> None:
    cached, stall = stalled_store
    tokens = cached.warm(ROWS)
    stall.armed = True
    other.bump([ROWS[0]])
    stall.stalled()  # its connection is up, but it reads nothing more

    other.bump([ROWS[1]])  # not heard
    wait_until(lambda: not cached.local.live, LEASE + 0.5, "the lease to run out", 0.005)
    answer, trips = cached.counted(lambda: cached.fetch(ROWS[1:]))
    assert trips == 1, "nothing served from the cache"
    assert stored(answer[0]) == admin.get(ROWS[1]) != stored(tokens[1])


def test_a_listener_resuming_after_a_stall_serves_no_token_bumped_more_than_a_lease_ago(
    stalled_store: tuple[Cached, Stall], other: RedisTokenStore, admin: RedisClient
) -> None:
    a, b, x = ROWS[:3]
    cached, stall = stalled_store
    tokens = cached.warm([a, b, x])
    stall.armed = True
    other.bump([a])
    stall.stalled()
    other.bump([b])  # two more messages wait on the tracking connection, in order
    other.bump([x])
    bumped = time.monotonic()
    time.sleep(LEASE + 0.3)
    assert not cached.local.live

    stall.resume.release()  # it reads b's message (sent LEASE + 0.3 s ago) and stalls again
    stall.stalled()
    [served] = cached.fetch([x])

    assert time.monotonic() - bumped > LEASE
    assert served != tokens[2], "x was bumped more than a lease ago"
    assert stored(served) == admin.get(x)


# -- the bound, its memory, its events -------------------------------------------------------


def test_the_cache_holds_at_most_its_bound_evicting_the_least_recently_used(
    open_cached: OpenCached, other: RedisTokenStore
) -> None:
    rows = [f"alkey:users#{row}" for row in range(20)]
    hot = rows[0]
    other.fetch(rows)  # created before this store listens
    cached = open_cached(local_cache=5)
    cached.warm([hot])

    for row in rows[1:]:
        cached.fetch([row])
        _, trips = cached.counted(lambda: cached.fetch([hot]))
        assert trips == 0, "the hot token, used all along, stays"

    stats = cached.local.stats()
    assert (stats.entries, stats.max_entries) == (5, 5)
    found = cached.local.lookup(rows)
    assert found is not None
    assert {row for row, token in zip(rows, found, strict=True) if token} == {hot, *rows[-4:]}
    _, trips = cached.counted(lambda: cached.fetch([rows[1]]))
    assert trips == 1, "the least recently used went first"

    cached.fetch(rows)  # more than the bound in one fetch
    assert cached.local.stats().entries == 5


def test_the_memory_the_cache_takes_is_reported_and_grows_with_its_entries(
    open_cached: OpenCached, other: RedisTokenStore
) -> None:
    rows = [f"alkey:users#{row}" for row in range(200)]
    other.fetch(rows)
    cached = open_cached()
    empty = cached.local.stats()
    assert (empty.entries, empty.memory > 0) == (0, True)

    cached.warm(rows[:10])
    ten = cached.local.stats()
    cached.warm(rows)
    full = cached.local.stats()

    assert (ten.entries, full.entries) == (10, 200)
    assert empty.memory < ten.memory < full.memory
    assert full.memory - empty.memory > 10 * (ten.memory - empty.memory)
    cached.store.close_local_cache()
    emptied = cached.local.stats()
    assert emptied.entries == 0
    assert emptied.memory < ten.memory


def test_observers_hear_lookups_invalidations_and_flushes_with_their_counts(
    open_cached: OpenCached, admin: RedisClient, other: RedisTokenStore
) -> None:
    a, b, c, d = ROWS[:4]
    other.fetch([a, b, c, d])
    cached = open_cached()
    cached.warm([a, b])
    events = cached.events
    main = threading.get_ident()

    events.lookups.clear()
    cached.fetch([a, b, c])
    cached.fetch([a, b, c])
    assert events.lookups == [(2, 1), (3, 0)]

    other.bump([a, b])  # one script, one message for both keys
    wait_until(lambda: len(events.invalidations) > 0, DEADLINE, "the bump's invalidation", 0.001)
    assert [(event.count, event.evicted) for event in events.invalidations] == [(2, 2)]
    assert events.invalidations[0].thread != main, "heard by the listener"

    events.invalidations.clear()
    cached.store.bump([c])
    own = [event for event in events.invalidations if event.thread == main]
    assert [event.count for event in own] == [1], "the bump evicted before it returned"
    wait_until(lambda: len(events.invalidations) == 2, DEADLINE, "Redis's message", 0.001)
    # The bump's own eviction and Redis's message of it: whichever came first evicted.
    assert sorted((event.count, event.evicted) for event in events.invalidations) == [
        (1, 0),
        (1, 1),
    ]

    cached.warm([a, b, c, d])
    admin.flushall()
    wait_until(lambda: len(events.flushes) > 0, DEADLINE, "the FLUSHALL", 0.001)
    assert [entries for _, entries in events.flushes] == [4]
    assert "flushed" in events.flushes[0][0]

    heard = len(events.invalidations)
    other.fetch([a, b])  # created again, by another process: one message
    wait_until(lambda: len(events.invalidations) > heard, DEADLINE, "their creation", 0.001)
    cached.warm([a, b])
    cached.store.close_local_cache()
    assert len(events.flushes) == 2
    assert events.flushes[-1][0].endswith("closed")
    assert events.flushes[-1][1] == 2


# -- configuration ---------------------------------------------------------------------------


def test_the_local_cache_is_configured_from_the_url_the_environment_and_the_settings(
    server: EmbeddedRedis,
) -> None:
    url = f"{server.url}?alkey_local_cache=1000"
    configuration = configure(url=url, env={})
    assert configuration.store_options.local_cache == 1000
    assert configure(env={"ALKEY_LOCAL_CACHE": "50"}).store_options.local_cache == 50
    assert configure({"alkey.local_cache": "25"}, env={}).store_options.local_cache == 25
    assert configure(url=server.url, env={}).store_options.local_cache == 0

    store = configuration.store()
    assert isinstance(store, RedisTokenStore)
    try:
        assert store.local is not None
        assert store.local.max_entries == 1000
    finally:
        store.close_local_cache()
        store.client.close()
    plain = configure(url=server.url, env={}).store()
    assert isinstance(plain, RedisTokenStore)
    assert plain.local is None
    plain.client.close()


@pytest.mark.parametrize(
    ("spelling", "configure_"),
    [
        pytest.param(
            "alkey_local_cache='-1'",
            lambda: configure(url="redis://127.0.0.1:1/0?alkey_local_cache=-1", env={}),
            id="url-negative",
        ),
        pytest.param(
            "alkey_local_cache='many'",
            lambda: configure(url="redis://127.0.0.1:1/0?alkey_local_cache=many", env={}),
            id="url-word",
        ),
        pytest.param(
            "ALKEY_LOCAL_CACHE='many'",
            lambda: configure(env={"ALKEY_LOCAL_CACHE": "many"}),
            id="environment",
        ),
        pytest.param(
            "alkey.local_cache = '-1'",
            lambda: configure({"alkey.local_cache": "-1"}, env={}),
            id="settings",
        ),
        pytest.param("local_cache=-1", lambda: configure(local_cache=-1, env={}), id="keyword"),
    ],
)
def test_an_invalid_local_cache_setting_is_refused_naming_it_and_the_accepted_form(
    spelling: str, configure_: Callable[[], object]
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        configure_()
    message = str(refused.value)
    assert spelling in message
    assert "a whole number of tokens to keep" in message


def test_a_store_refuses_a_negative_local_cache(admin: RedisClient) -> None:
    with pytest.raises(ConfigurationError, match="local_cache"):
        RedisTokenStore(admin, local_cache=-1)


# -- fork, close -----------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_a_forked_child_starts_with_an_empty_cache_that_does_not_serve(
    open_cached: OpenCached,
) -> None:
    cached = open_cached()
    cached.warm(ROWS)
    assert cached.local.stats().entries == len(ROWS)
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            stats = cached.local.stats()
            served = cached.local.lookup(ROWS)
            os.write(write, f"{stats.entries} {stats.live} {served is None}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert report == "0 False True"
    assert cached.local.live, "the parent's cache goes on"
    _, trips = cached.counted(lambda: cached.fetch(ROWS))
    assert trips == 0


@pytest.mark.usefixtures("rows")
def test_closing_the_local_cache_stops_serving_and_ends_its_listener(
    open_cached: OpenCached, admin: RedisClient
) -> None:
    before = listener_threads()
    cached = open_cached()
    tokens = cached.warm(ROWS)
    [thread] = listener_threads() - before
    [tracking] = tracking_clients(admin)

    cached.store.close_local_cache()

    assert not cached.local.live
    answer, trips = cached.counted(lambda: cached.fetch(ROWS))
    assert (answer, trips) == (tokens, 1)
    _, trips = cached.counted(lambda: cached.fetch(ROWS))
    assert trips == 1, "nothing is cached any more"
    thread.join(DEADLINE)
    assert not thread.is_alive()
    wait_until(
        lambda: all(client["id"] != tracking["id"] for client in admin.client_list()),
        DEADLINE,
        "the tracking connection to close",
    )
    assert tracking_clients(admin) == []


@pytest.mark.usefixtures("rows")
def test_after_closing_the_local_cache_fetches_start_no_listener(
    open_cached: OpenCached, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = listener_threads()
    cached = open_cached()
    cached.warm(ROWS)
    [thread] = listener_threads() - before
    cached.store.close_local_cache()
    thread.join(DEADLINE)
    started: list[str] = []
    start = threading.Thread.start

    def counted_start(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    monkeypatch.setattr(threading.Thread, "start", counted_start)
    for _ in range(5):
        cached.fetch(ROWS)
    assert started == []


# -- asyncio ---------------------------------------------------------------------------------


@dataclass
class AsyncCached:
    """An asyncio store with the local cache on, on a client of its own."""

    store: AsyncRedisTokenStore
    client: redis.asyncio.Redis
    pool: CountedAsyncPool
    events: Recorder

    @property
    def local(self) -> LocalTokens:
        local = self.store.local
        assert local is not None
        return local

    async def counted(self, identifiers: Sequence[str]) -> tuple[list[str], int]:
        before = self.pool.requests()
        tokens = await self.store.afetch(identifiers)
        return tokens, self.pool.requests() - before

    async def warm(self, identifiers: Sequence[str]) -> list[str]:
        """As :meth:`Cached.warm`."""
        deadline = time.monotonic() + DEADLINE
        while True:
            hits = self.local.hits
            tokens, trips = await self.counted(identifiers)
            if trips == 0 and self.local.hits - hits == len(identifiers):
                return tokens
            assert time.monotonic() < deadline, "the tokens were not cached"
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        self.store.close_local_cache()
        await self.client.aclose()


async def eventually(check: Callable[[], object], what: str) -> None:
    """Let the loop run until ``check()`` is true (the listener is a task on it)."""
    deadline = time.monotonic() + DEADLINE
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def async_cached(url: str) -> AsyncCached:
    pool = CountedAsyncPool.from_url(
        url,
        connection_class=CountedAsyncConnection,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        retry=AsyncRetry(NoBackoff(), 0),
    )
    client = redis.asyncio.Redis.from_pool(pool)
    events = Recorder()
    store = AsyncRedisTokenStore(
        client, local_cache=1000, retry_interval=RETRY_INTERVAL, observers=[events]
    )
    return AsyncCached(store, client, pool, events)


@pytest.mark.usefixtures("rows")
def test_asyncio_a_warm_key_costs_no_round_trip(server: EmbeddedRedis, admin: RedisClient) -> None:
    async def scenario() -> None:
        cached = async_cached(server.url)
        try:
            tokens = await cached.warm(ROWS)
            scripts = script_calls(admin)
            for _ in range(100):
                assert await cached.counted(ROWS) == (tokens, 0)
            assert script_calls(admin) == scripts
            assert [stored(token) for token in tokens] == admin.mget(ROWS)
        finally:
            await cached.close()

    asyncio.run(scenario())


@pytest.mark.usefixtures("rows")
def test_asyncio_another_clients_bump_invalidates_and_its_own_bump_evicts_at_once(
    server: EmbeddedRedis, admin: RedisClient, other: RedisTokenStore
) -> None:
    async def scenario() -> None:
        cached = async_cached(server.url)
        try:
            tokens = await cached.warm(ROWS)

            other.bump([ROWS[1]])
            await eventually(lambda: cached.events.invalidations, "the bump's invalidation")
            after = await cached.store.afetch(ROWS)
            assert after[1] != tokens[1]
            assert stored(after[1]) == admin.get(ROWS[1])
            assert after[:1] + after[2:] == tokens[:1] + tokens[2:]

            await cached.store.abump([ROWS[2]])
            mine = await cached.store.afetch(ROWS)  # no wait for Redis's message
            assert mine[2] != after[2]
            assert stored(mine[2]) == admin.get(ROWS[2])
            assert mine[:2] + mine[3:] == after[:2] + after[3:]
        finally:
            await cached.close()

    asyncio.run(scenario())


@pytest.mark.usefixtures("rows")
def test_asyncio_a_killed_tracking_connection_empties_the_cache_until_it_is_back(
    server: EmbeddedRedis, admin: RedisClient, other: RedisTokenStore
) -> None:
    async def scenario() -> None:
        cached = async_cached(server.url)
        try:
            tokens = await cached.warm(ROWS)
            assert admin.client_kill_filter(_type="pubsub") == 1
            other.bump([ROWS[0]])
            await eventually(
                lambda: cached.events.flushed_because("lost"),
                "the cache to be emptied",
            )
            assert cached.local.stats().entries == 0
            during, trips = await cached.counted(ROWS)
            assert trips == 1
            assert stored(during[0]) == admin.get(ROWS[0]) != stored(tokens[0])
            assert during[1:] == tokens[1:]
            assert await cached.warm(ROWS) == during, "and it comes back by itself"
            assert len(tracking_clients(admin)) == 1
        finally:
            await cached.close()

    asyncio.run(scenario())


@pytest.mark.usefixtures("rows")
def test_an_idle_healthy_cache_keeps_serving_past_the_lease(
    open_cached: OpenCached,
) -> None:
    """An idle but healthy cache keeps serving past the lease: the listener's pings."""
    assert localcache.PING_EVERY < LEASE
    cached = open_cached()
    tokens = cached.warm(ROWS)
    time.sleep(LEASE * 1.5)
    assert cached.local.live
    assert cached.counted(lambda: cached.fetch(ROWS)) == (tokens, 0)
