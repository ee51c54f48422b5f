"""How long a reader process keeps serving a token after a writer process bumped it.

Part of ``python -m benchmarks.localcache`` (see there). One writer process bumps tokens
-- first at a steady rate, then in a burst, back to back -- and writes down
``time.monotonic()`` right after each bump returns. Reader processes with the local
token cache on generate keys in a loop meanwhile (all warm, but for the rows the writer
bumped: the load a busy web worker puts on its own GIL), and write down the
``time.monotonic()`` at which their observer's ``local_invalidated`` event sees each
bumped row. ``CLOCK_MONOTONIC`` is one clock for the whole machine on Linux, so the
difference of the two, per bump and reader, is the delay during which that reader could
still serve the old token: Redis's broadcast, the listener thread's wake-up, and its wait
for the GIL.

Each bump is shaped like a commit of one row (the row's token, its table's and the
global one) and names a row no other bump of the run names, so each reader's first
invalidation of that row is the one the bump caused. The observer event carries counts,
not names, so the reader also wraps its cache's ``invalidated`` (what the listener calls
with Redis's message) to note the names that the next event is about.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.synchronize
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.keys import CacheKeyGenerator
from alkey.observers import LoggingObserver, StoreObserver
from alkey.testing import CountingConnection, counting_client
from alkey.tokens import RedisTokenStore
from benchmarks.workload import TABLE, load, seed

#: Rows the readers read (in keys of KEY_SIZE instances), and a bump never names twice.
ROWS = 5000
KEY_SIZE = 10
#: The table's all-rows token, which a commit bumps besides its rows.
ALL_ROWS_TOKEN = TABLE + "*"


@dataclass(frozen=True)
class Load:
    """One phase of the writer: ``bumps`` bumps, ``rate`` per second (0: back to back)."""

    name: str
    bumps: int
    rate: float


@dataclass(frozen=True)
class DelayPlan:
    #: Each run: how many reader processes, and whether they generate keys meanwhile
    #: (busy) or only listen (idle: the delay without any contention for the GIL).
    readers: tuple[tuple[int, bool], ...]
    loads: tuple[Load, ...]


FULL_DELAY = DelayPlan(
    readers=((2, False), (2, True), (4, True)),
    loads=(Load("steady, 500/s", 2000, 500.0), Load("burst", 2000, 0.0)),
)


def row(number: int) -> str:
    return f"{TABLE}{number}"


# -- the processes ----------------------------------------------------------------------------


class Recorder(StoreObserver):
    """A reader's observer: when ``local_invalidated`` fires, the names it is about (noted by
    the wrapped ``invalidated``) and the monotonic time."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.events: list[tuple[float, int, list[str]]] = []
        self.flushes: list[str] = []

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        now = time.monotonic()
        names, self.names = self.names, None
        if names is not None:
            self.events.append((now, evicted, names))

    def local_flushed(self, *, reason: str, entries: int) -> None:
        self.flushes.append(reason)


def _text(key: object) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


def reader(
    url: str,
    database: str,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    out: Any,
    number: int,
    busy: bool,
) -> None:
    """Generate keys of :data:`KEY_SIZE` loaded rows, all :data:`ROWS` of them in turn,
    until ``stop`` (``busy``; else only listen); put what the observer saw on ``out``."""
    engine = create_engine(f"sqlite:///{database}")
    recorder = Recorder()
    store = RedisTokenStore(
        counting_client(url, socket_timeout=5),
        local_cache=2 * ROWS,
        observers=[LoggingObserver(), recorder],
    )
    local = store.local
    assert local is not None
    original = local.invalidated

    def invalidated(keys: Any, *args: Any, **kwargs: Any) -> None:
        recorder.names = None if keys is None else [_text(key) for key in keys]
        original(keys, *args, **kwargs)

    # The listener looks the method up on each message: this sees every one of them.
    local.invalidated = invalidated  # type: ignore[method-assign]
    generator = CacheKeyGenerator(tokens=store)
    with Session(engine) as session:
        items = load(session, 1, ROWS)
        groups = [items[start : start + KEY_SIZE] for start in range(0, ROWS, KEY_SIZE)]
        generator(*groups[0])  # starts the listener
        deadline = time.monotonic() + 30
        while not local.live and time.monotonic() < deadline:
            time.sleep(0.005)
        for group in groups:  # fills the cache
            generator(*group)
        before = local.stats()
        recorder.events.clear()
        ready.set()
        keys = 0
        trips = CountingConnection.requests
        started = time.monotonic()
        while busy and not stop.is_set():
            for group in groups:
                generator(*group)
            keys += len(groups)
        stop.wait()
        seconds = time.monotonic() - started
        trips = CountingConnection.requests - trips
    stats = local.stats()
    flushes = list(recorder.flushes)
    store.close_local_cache()
    out.put(
        (
            "reader",
            number,
            {
                "events": recorder.events,
                "flushes": flushes,
                "filled": before.entries,
                "keys": keys,
                "trips": trips,
                "seconds": seconds,
                "hits": stats.hits - before.hits,
                "misses": stats.misses - before.misses,
            },
        )
    )


def writer(url: str, loads: Sequence[Load], out: Any) -> None:
    """Bump each load's rows (one commit-shaped bump per row, rows never named twice),
    noting the monotonic time before each bump is sent and after it returns."""
    store = RedisTokenStore(counting_client(url, socket_timeout=5))
    store.bump([row(ROWS + 1)])  # the script loaded, the connection warm
    first = 1
    for phase in loads:
        bumps: list[tuple[str, float, float]] = []
        started = time.monotonic()
        for index in range(phase.bumps):
            if phase.rate:
                wait = started + index / phase.rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            name = row(first + index)
            sent = time.monotonic()
            store.bump([name, ALL_ROWS_TOKEN, GLOBAL_WRITE_TOKEN])
            bumps.append((name, sent, time.monotonic()))
        out.put(("writer", phase.name, bumps))
        first += phase.bumps
        time.sleep(0.5)  # the last invalidations land before the next phase


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Delays:
    """One load with one number of readers: every (reader, bump) delay, in seconds."""

    readers: int
    busy: bool
    load: Load
    delays: list[float]
    #: Bumps a reader never heard of (should be none).
    lost: int
    #: Of the invalidations heard, those that evicted a cached token.
    evicted: int
    heard: int
    #: What the writer achieved: bumps per second, and the median bump round trip.
    rate: float
    bump_ms: float
    #: The readers meanwhile: keys per second (all readers), round trips per key, and the
    #: share of identifiers answered from the cache.
    keys_per_second: float = 0.0
    trips_per_key: float = 0.0
    hit_share: float = 0.0
    flushes: int = 0

    def quantile(self, share: float) -> float:
        return quantile(self.delays, share)


def quantile(values: Sequence[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (linear between the nearest ranks)."""
    data = sorted(values)
    position = share * (len(data) - 1)
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def measure_delays(url: str, workdir: Path, plan: DelayPlan, progress: Any) -> list[Delays]:
    """Every load with every number of readers: fresh reader processes for each number."""
    database = workdir / "delay.db"
    engine = create_engine(f"sqlite:///{database}")
    seed(engine, 1, ROWS + 1)
    engine.dispose()
    # Every token exists before the readers start: their fetches then write nothing, and
    # the only invalidations are the writer's.
    warm = RedisTokenStore(counting_client(url))
    every = [row(n) for n in range(1, ROWS + 2)]
    for start in range(0, len(every), 1000):
        warm.fetch(every[start : start + 1000])
    results = []
    for readers, busy in plan.readers:
        started = time.monotonic()
        results.extend(_one_run(url, str(database), readers, busy, plan.loads))
        progress(
            f"  invalidation delay, {readers} {'busy' if busy else 'idle'} readers: "
            f"{time.monotonic() - started:.1f} s"
        )
    return results


def _one_run(
    url: str, database: str, readers: int, busy: bool, loads: Sequence[Load]
) -> list[Delays]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    stop = context.Event()
    readies = [context.Event() for _ in range(readers)]
    processes = [
        context.Process(target=reader, args=(url, database, readies[n], stop, out, n, busy))
        for n in range(readers)
    ]
    for process in processes:
        process.start()
    try:
        for ready in readies:
            if not ready.wait(120):
                raise RuntimeError("a reader process did not get ready within 120 s")
        time.sleep(0.3)
        write = context.Process(target=writer, args=(url, loads, out))
        write.start()
        bumps: dict[str, list[tuple[str, float, float]]] = {}
        for _ in loads:
            _, name, data = out.get(timeout=300)
            bumps[name] = data
        write.join(60)
        stop.set()
        seen: dict[int, dict[str, Any]] = {}
        for _ in processes:
            _, number, data = out.get(timeout=120)
            seen[number] = data
        for process in processes:
            process.join(60)
    finally:
        stop.set()
        for process in processes:
            if process.is_alive():
                process.terminate()
    return [_delays(readers, busy, phase, bumps[phase.name], seen) for phase in loads]


def _delays(
    readers: int,
    busy: bool,
    phase: Load,
    bumps: list[tuple[str, float, float]],
    seen: dict[int, dict[str, Any]],
) -> Delays:
    delays: list[float] = []
    lost = evicted = heard = flushes = 0
    for data in seen.values():
        first: dict[str, tuple[float, int]] = {}
        for when, dropped, names in data["events"]:
            for name in names:
                if name not in first:
                    first[name] = (when, dropped)
        flushes += len(data["flushes"])
        for name, _, returned in bumps:
            found = first.get(name)
            if found is None:
                lost += 1
                continue
            delays.append(found[0] - returned)
            heard += 1
            evicted += found[1] > 0
    span = bumps[-1][2] - bumps[0][1]
    keys = sum(data["keys"] for data in seen.values())
    seconds = max(data["seconds"] for data in seen.values())
    hits = sum(data["hits"] for data in seen.values())
    lookups = hits + sum(data["misses"] for data in seen.values())
    return Delays(
        readers=readers,
        busy=busy,
        load=phase,
        delays=delays,
        lost=lost,
        evicted=evicted,
        heard=heard,
        rate=len(bumps) / span if span > 0 else 0.0,
        bump_ms=statistics.median(returned - sent for _, sent, returned in bumps) * 1000,
        keys_per_second=keys / seconds if seconds else 0.0,
        trips_per_key=sum(data["trips"] for data in seen.values()) / keys if keys else 0.0,
        hit_share=hits / lookups if lookups else 0.0,
        flushes=flushes,
    )
