"""Observers hear of every incident of a token store, with counts, and never break it.

Each test runs against a real Redis, once with the sync store and once with the asyncio
store (both drive the same calls, so they must report the same events). Outages are real:
a private redis-server stopped and started again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

import alkey
from alkey.asyncio import AsyncRedisTokenStore
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreUnavailableError
from alkey.observers import LoggingObserver, ObserverGroup, StoreObserver
from alkey.tokens import RedisTokenStore, ScriptStore

from .models import User
from .support.pools import take_connection

_T = TypeVar("_T")
FLAVOURS = ["sync", "asyncio"]


class Recorder(StoreObserver):
    """Every event, in order, with its arguments."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def _add(self, name: str, **arguments: Any) -> None:
        with self._lock:
            self.events.append((name, arguments))

    def of(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [arguments for event, arguments in self.events if event == name]

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        self._add("fetched", identifiers=list(identifiers), missed=missed)

    def bumped(self, *, count: int, replayed: int) -> None:
        self._add("bumped", count=count, replayed=replayed)

    def bump_kept(self, *, count: int, pending: int) -> None:
        self._add("bump_kept", count=count, pending=pending)

    def dropped(self, *, count: int, max_pending: int) -> None:
        self._add("dropped", count=count, max_pending=max_pending)

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        self._add(
            "outage_began",
            action=action,
            error=error,
            pending=pending,
            dropped=dropped,
            max_pending=max_pending,
        )

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        self._add("outage_ended", replayed=replayed, dropped=dropped)

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        self._add("pool_exhausted", action=action, error=error, pending=pending)

    def pool_recovered(self, *, starved: int) -> None:
        self._add("pool_recovered", starved=starved)

    def intents_claimed(self, *, count: int) -> None:
        self._add("intents_claimed", count=count)

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        self._add("recovery_began", claimed=claimed, lease=lease, backlog=backlog)

    def recovery_ended(self, *, total: int, lease: float, backlog: bool) -> None:
        self._add("recovery_ended", total=total, lease=lease, backlog=backlog)


class Raising(StoreObserver):
    """An observer with a bug in every event it listens to."""

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        raise RuntimeError("observer bug")

    def bumped(self, *, count: int, replayed: int) -> None:
        raise RuntimeError("observer bug")

    def bump_kept(self, *, count: int, pending: int) -> None:
        raise RuntimeError("observer bug")

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        raise RuntimeError("observer bug")


class Driver:
    """A sync or asyncio store behind one synchronous face (asyncio: on a loop of the
    test's own, with a client of its own)."""

    def __init__(self, flavour: str, url: str, **options: Any) -> None:
        self.flavour = flavour
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sync: RedisTokenStore | None = None
        self.aio: AsyncRedisTokenStore | None = None
        client_options: dict[str, Any] = {
            "socket_timeout": 0.3,
            "socket_connect_timeout": 0.3,
            "retry": None,
            **options.pop("client_options", {}),
        }
        if flavour == "sync":
            self.client: Any = redis.Redis.from_url(url, **client_options)
            self.sync = RedisTokenStore(self.client, **options)
        else:
            self.loop = asyncio.new_event_loop()
            self.client = redis.asyncio.Redis.from_url(url, **client_options)
            self.aio = AsyncRedisTokenStore(self.client, **options)

    @property
    def store(self) -> ScriptStore:
        store = self.sync if self.sync is not None else self.aio
        assert store is not None
        return store

    def _run(self, call: Coroutine[Any, Any, _T]) -> _T:
        assert self.loop is not None
        return self.loop.run_until_complete(call)

    def fetch(self, identifiers: list[str]) -> list[str]:
        if self.sync is not None:
            return self.sync.fetch(identifiers)
        assert self.aio is not None
        return self._run(self.aio.afetch(identifiers))

    def bump(self, identifiers: list[str], intent: str | None = None) -> None:
        if self.sync is not None:
            self.sync.bump(identifiers, intent=intent)
        else:
            assert self.aio is not None
            self._run(self.aio.abump(identifiers, intent=intent))

    def intend(self, identifiers: list[str]) -> str | None:
        if self.sync is not None:
            return self.sync.intend(identifiers)
        assert self.aio is not None
        return self._run(self.aio.aintend(identifiers))

    def wait_replayed(self, timeout: float) -> bool:
        if self.sync is not None:
            return self.sync.wait_replayed(timeout)
        assert self.aio is not None
        return self._run(self.aio.wait_replayed(timeout))

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
            return
        self._run(self.client.aclose())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        # Let a replay task still sleeping end with the loop, without a warning.
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                self.loop.run_until_complete(task)
        self.loop.close()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to stop and start."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def open_store(flavour: str, url: str, **options: Any) -> Iterator[tuple[Driver, Recorder]]:
    recorder = Recorder()
    driver = Driver(flavour, url, observers=[LoggingObserver(), recorder], **options)
    try:
        yield driver, recorder
    finally:
        driver.close()


def test_fetches_and_bumps_report_their_counts_and_whether_the_answer_was_a_forced_miss(
    flavour: str, redis_url: str
) -> None:
    for driver, recorder in open_store(flavour, redis_url):
        ids = ["alkey:users#1", "alkey:users#2", "alkey:users#*"]
        driver.fetch(ids)
        driver.bump(ids[:2])
        assert recorder.events == [
            ("fetched", {"identifiers": ids, "missed": False}),
            ("bumped", {"count": 2, "replayed": 0}),
        ]


class Timer(StoreObserver):
    """The round trips a store reports, in order."""

    def __init__(self) -> None:
        self.round_trips: list[tuple[str, float, bool]] = []

    def round_trip(self, *, operation: str, seconds: float, failed: bool) -> None:
        self.round_trips.append((operation, seconds, failed))


def test_each_round_trip_reports_its_operation_and_duration_and_a_failed_one_says_so(
    flavour: str, private_redis: EmbeddedRedis
) -> None:
    timer = Timer()
    driver = Driver(flavour, private_redis.url, durable=True, retry_interval=60, observers=[timer])
    try:
        began = time.perf_counter()
        driver.fetch(["alkey:users#1", "alkey:users#*"])
        intent = driver.intend(["alkey:users#1", "alkey:users#*"])
        assert intent is not None
        driver.bump(["alkey:users#1", "alkey:users#*"], intent=intent)
        elapsed = time.perf_counter() - began
        assert [(operation, failed) for operation, _, failed in timer.round_trips] == [
            ("fetch", False),
            ("intend", False),
            ("bump", False),
        ]
        durations = [seconds for _, seconds, _ in timer.round_trips]
        assert all(seconds > 0 for seconds in durations)
        assert sum(durations) <= elapsed, "each is one round trip, not more than the calls"

        private_redis.stop()
        driver.fetch(["alkey:users#1"])  # the round trip fails: a forced miss
        operation, seconds, failed = timer.round_trips[-1]
        assert (operation, failed) == ("fetch", True)
        assert 0 < seconds < 5
        driver.fetch(["alkey:users#1"])  # Redis is known to be down: no round trip
        assert len(timer.round_trips) == 4
    finally:
        driver.close()


def test_an_outage_reports_its_beginning_the_kept_bumps_the_misses_and_its_end_with_counts(
    flavour: str, private_redis: EmbeddedRedis
) -> None:
    for driver, recorder in open_store(flavour, private_redis.url, retry_interval=0.05):
        driver.fetch(["alkey:users#1"])
        private_redis.stop()
        driver.bump(["alkey:users#1", "alkey:users#2", "alkey:users#*"])
        driver.fetch(["alkey:users#1"])
        [kept] = recorder.of("bump_kept")
        assert kept == {"count": 3, "pending": 3}
        [began] = recorder.of("outage_began")
        assert began["action"] == "bump 3 token(s)"
        assert (began["pending"], began["dropped"], began["max_pending"]) == (3, 0, 100_000)
        assert isinstance(began["error"], TokenStoreUnavailableError)
        assert isinstance(began["error"].__cause__, redis.ConnectionError)
        assert recorder.of("fetched")[-1] == {"identifiers": ["alkey:users#1"], "missed": True}
        assert recorder.of("outage_ended") == []

        private_redis.start()
        assert driver.wait_replayed(timeout=5)
        assert recorder.of("outage_ended") == [{"replayed": 3, "dropped": 0}]
        assert {"count": 3, "replayed": 3} in recorder.of("bumped")
        assert len(recorder.of("outage_began")) == 1, "one incident, reported once"


def test_bumps_past_max_pending_report_how_many_were_dropped_for_the_global_token(
    flavour: str, private_redis: EmbeddedRedis
) -> None:
    for driver, recorder in open_store(
        flavour, private_redis.url, max_pending=2, retry_interval=0.05
    ):
        private_redis.stop()
        driver.bump([f"alkey:users#{n}" for n in range(5)])
        assert recorder.of("dropped") == [{"count": 3, "max_pending": 2}]
        assert recorder.of("bump_kept") == [{"count": 5, "pending": 3}]  # 2 + alkey:*#?
        private_redis.start()
        assert driver.wait_replayed(timeout=5)
        assert recorder.of("outage_ended") == [{"replayed": 3, "dropped": 3}]


def test_an_exhausted_pool_reports_the_starved_call_and_the_recovery_without_an_outage(
    flavour: str, redis_url: str
) -> None:
    client_options = {"max_connections": 1, "socket_timeout": 0.1}
    for driver, recorder in open_store(flavour, redis_url, client_options=client_options):
        timer = Timer()
        driver.store.add_observer(timer)
        pool = driver.client.connection_pool
        held = take_connection(pool) if flavour == "sync" else driver._run(take_connection(pool))
        driver.fetch(["alkey:users#1"])
        if flavour == "sync":
            pool.release(held)
        else:
            driver._run(pool.release(held))
        driver.fetch(["alkey:users#1"])
        assert [(op, failed) for op, _, failed in timer.round_trips] == [("fetch", False)], (
            "a call that got no connection made no round trip"
        )
        [exhausted] = recorder.of("pool_exhausted")
        assert (exhausted["action"], exhausted["pending"]) == ("fetch tokens", 0)
        assert recorder.of("pool_recovered") == [{"starved": 1}]
        assert [f["missed"] for f in recorder.of("fetched")] == [True, False]
        assert recorder.of("outage_began") == [], "an exhausted pool is no outage"


def test_a_durable_store_reports_the_intents_it_claims_and_the_recovery_with_totals(
    flavour: str, redis_url: str
) -> None:
    for driver, recorder in open_store(flavour, redis_url, durable=True, lease=0.05):
        assert driver.intend(["alkey:users#1", "alkey:users#2"]) is not None  # never bumped
        time.sleep(0.1)
        driver.fetch(["alkey:users#3"])
        assert recorder.of("intents_claimed") == [{"count": 1}]
        assert recorder.of("recovery_began") == [{"claimed": 1, "lease": 0.05, "backlog": False}]
        assert {"count": 2, "replayed": 2} in recorder.of("bumped")
        assert recorder.of("recovery_ended") == [{"total": 1, "lease": 0.05, "backlog": False}]


def test_an_observer_that_raises_breaks_neither_fetch_nor_bump_and_is_reported_once(
    flavour: str, private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    driver = Driver(flavour, private_redis.url, observers=[Raising()], retry_interval=0.05)
    try:
        with caplog.at_level(logging.ERROR, logger="alkey.observers"):
            [before] = driver.fetch(["alkey:users#1"])
            assert driver.fetch(["alkey:users#1"]) == [before]
            driver.bump(["alkey:users#1"])
            driver.bump(["alkey:users#1"])
            assert driver.fetch(["alkey:users#1"]) != [before]
            private_redis.stop()
            driver.bump(["alkey:users#2"])  # kept, despite the observer
            assert driver.store.pending == {"alkey:users#2"}
            private_redis.start()
            assert driver.wait_replayed(timeout=5)
    finally:
        driver.close()
    reported = [(r.name, r.getMessage()) for r in caplog.records]
    assert len(reported) == 4, "once per event: fetched, bumped, bump_kept, outage_began"
    assert all(name == "alkey.observers" and "raised in" in text for name, text in reported)


def test_an_observer_that_raises_never_breaks_a_commit(
    tables: Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2, retry=None)
    store = RedisTokenStore(client, observers=[Raising()])
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=store)
    key_generator = CacheKeyGenerator(tokens=store)
    try:
        with caplog.at_level(logging.ERROR, logger="alkey.observers"), factory() as session:
            user = User(name="ada")
            session.add(user)
            session.commit()
            before = key_generator(user)
            user.name = "grace"
            session.commit()
            assert key_generator(user) != before
    finally:
        alkey.unbind(factory)
        client.close()
    assert caplog.records, "the observer's errors were reported"


def test_without_observers_an_outage_is_silent_and_observers_can_be_added_later(
    private_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    driver = Driver("sync", private_redis.url, observers=[], retry_interval=0)
    try:
        assert len(driver.store.observers) == 0
        private_redis.stop()
        with caplog.at_level(logging.DEBUG, logger="alkey"):
            driver.fetch(["alkey:users#1"])
        assert caplog.records == []
        recorder = Recorder()
        driver.store.add_observer(recorder)
        assert list(driver.store.observers) == [recorder]
        driver.fetch(["alkey:users#1"])
        assert recorder.of("fetched") == [{"identifiers": ["alkey:users#1"], "missed": True}]
    finally:
        driver.close()


def test_a_store_logs_through_one_logging_observer_by_default(redis_url: str) -> None:
    driver = Driver("sync", redis_url)
    try:
        [observer] = driver.store.observers
        assert type(observer) is LoggingObserver
    finally:
        driver.close()


def test_events_that_only_the_logging_observer_would_hear_are_never_dispatched() -> None:
    """The success path pays nothing for observers: fetched, bumped and round_trip have
    no hooks."""
    group = ObserverGroup([LoggingObserver()])
    assert len(group.fetched_hooks) == 0
    assert len(group.bumped_hooks) == 0
    assert len(group.round_trip_hooks) == 0, "round trips are then not even timed"
    recorder = Recorder()
    group.add(recorder)
    assert list(group.fetched_hooks) == [recorder.fetched]


def test_only_store_observers_are_accepted() -> None:
    with pytest.raises(TypeError, match="derives from StoreObserver"):
        ObserverGroup([object()])  # type: ignore[list-item]
