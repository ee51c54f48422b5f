"""A stale-read checker: concurrent writers and read-through readers, under disruption.

Writers commit increments of counters; readers serve the counters through a cache kept in
Redis under alkey keys (a miss reads the database and stores the value). A read is stale
when it returns a version older than the newest one committed *before the read began*.
Each scenario must see no stale read and a real hit rate.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from sqlalchemy import Engine, MetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.identity import row_identifier
from alkey.tokens import RedisTokenStore

COUNTERS = 5
SECONDS = 3.0


class Base(DeclarativeBase):
    metadata = MetaData()


class Counter(Base):
    __tablename__ = "stale_counters"
    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(default=0)


@dataclass
class Tally:
    reads: int = 0
    hits: int = 0
    stale: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def counters(tables: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    with Session(tables) as session:
        session.add_all([Counter(id=index, version=0) for index in range(COUNTERS)])
        session.commit()
    yield tables
    Base.metadata.drop_all(tables)


def run_checker(
    engine: Engine,
    server: EmbeddedRedis,
    disrupt: Callable[[EmbeddedRedis], None],
    *,
    with_alkey: bool = True,
) -> Tally:
    client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = RedisTokenStore(client, retry_interval=0.05)
    factory = sessionmaker(engine, expire_on_commit=False)
    if with_alkey:
        alkey.bind(factory, tokens=store)
    key_generator = CacheKeyGenerator(tokens=store)
    committed = [0] * COUNTERS  # newest version whose commit has returned
    committed_lock = threading.Lock()
    tally = Tally()
    stop = threading.Event()
    sqlite = engine.dialect.name == "sqlite"

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            index = rng.randrange(COUNTERS)
            try:
                with factory() as session:
                    counter = session.get_one(Counter, index)
                    # In SQL, so that concurrent writers never lose an increment (SQLite
                    # has no row locks): versions only ever grow.
                    counter.version = Counter.version + 1
                    session.flush()
                    session.refresh(counter)
                    version = counter.version
                    session.commit()
            except Exception as error:  # SQLite's lock timeouts under contention
                if not sqlite:
                    tally.errors.append(error)
                continue
            with committed_lock:
                committed[index] = max(committed[index], version)
            time.sleep(0.002)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            index = rng.randrange(COUNTERS)
            with committed_lock:
                floor = committed[index]
            key = key_generator(row_identifier(Counter.__table__, index), "page")
            try:
                cached = client.get(key)
            except redis.RedisError:
                cached = None
            hit = cached is not None
            if hit:
                assert cached is not None
                version = int(cached)
            else:
                with factory() as session:
                    version = session.get_one(Counter, index).version
                with contextlib.suppress(redis.RedisError):
                    client.set(key, version, ex=60)
            with tally.lock:
                tally.reads += 1
                tally.hits += hit
                if version < floor:
                    tally.stale.append(f"counter {index}: read {version}, committed {floor}")

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(2)]
    threads += [threading.Thread(target=reader, args=(100 + seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(SECONDS / 3)
        disrupt(server)
        time.sleep(SECONDS * 2 / 3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        alkey.unbind(factory)
        client.close()
    return tally


def nothing(server: EmbeddedRedis) -> None:
    pass


def flushall(server: EmbeddedRedis) -> None:
    redis.Redis.from_url(server.url).flushall()


def restart(server: EmbeddedRedis) -> None:
    server.stop()
    time.sleep(0.3)
    server.start()


def cut_link(server: EmbeddedRedis) -> None:
    server.pause()  # every connection hangs, as on a cut link
    time.sleep(0.8)
    server.resume()


@pytest.mark.parametrize(
    "disrupt", [nothing, flushall, restart, cut_link], ids=lambda f: f.__name__
)
def test_no_read_is_ever_staler_than_the_last_committed_write(
    counters: Engine, private_redis: EmbeddedRedis, disrupt: Callable[[EmbeddedRedis], None]
) -> None:
    tally = run_checker(counters, private_redis, disrupt)
    print(
        f"{disrupt.__name__}: {tally.reads} reads, "
        f"hit rate {tally.hits / max(tally.reads, 1):.0%}, {len(tally.stale)} stale"
    )
    assert tally.errors == []
    assert tally.stale == []
    assert tally.reads > 100
    assert tally.hits / tally.reads > 0.2, "the cache must actually serve reads"


def test_the_checker_sees_stale_reads_when_nothing_invalidates(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    tally = run_checker(counters, private_redis, nothing, with_alkey=False)
    assert tally.stale, "without alkey's bumps, cached counters go stale"
