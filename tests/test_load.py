"""Load: threads and processes commit and generate keys; nothing fails, nothing grows.

CI-sized by default (a few seconds); ``ALKEY_LOAD_SECONDS=60`` runs the long version.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine, MetaData, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisTokenStore

from .stale_worker import is_lock_timeout

SECONDS = float(os.environ.get("ALKEY_LOAD_SECONDS", "4"))
ROWS = 50


class Base(DeclarativeBase):
    metadata = MetaData()


class Item(Base):
    __tablename__ = "load_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    hits: Mapped[int] = mapped_column(default=0)


def work(
    database_url: str, redis_url: str, seconds: float, seed: int
) -> tuple[int, int, int, list[str]]:
    """Commit increments and generate keys until time is up: (commits, keys, SQLite lock
    timeouts, other errors)."""
    engine = create_engine(
        database_url, connect_args={"timeout": 30} if "sqlite" in database_url else {}
    )
    client = redis.Redis.from_url(redis_url)
    factory = sessionmaker(engine)
    alkey.bind(factory, tokens=RedisTokenStore(client))
    key_generator = CacheKeyGenerator(client)
    commits = keys = lock_timeouts = 0
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    index = seed
    while time.monotonic() < deadline:
        index = (index * 7 + 3) % ROWS
        try:
            with factory() as session:
                item = session.get_one(Item, index)
                item.hits = Item.hits + 1
                session.commit()
            commits += 1
            for _ in range(5):
                key_generator(f"alkey:load_items#{index}", "page", seed)
                keys += 1
        except Exception as error:
            if is_lock_timeout(error):
                lock_timeouts += 1
            else:
                errors.append(repr(error))
    alkey.unbind(factory)
    client.close()
    engine.dispose()
    return commits, keys, lock_timeouts, errors


@pytest.fixture
def items(tables: Engine) -> Iterator[Engine]:
    Base.metadata.drop_all(tables)
    Base.metadata.create_all(tables)
    with Session(tables) as session:
        session.add_all([Item(id=index) for index in range(ROWS)])
        session.commit()
    yield tables
    Base.metadata.drop_all(tables)


def test_threads_and_processes_under_load_see_no_errors_and_leak_nothing(
    items: Engine, redis_url: str, redis_client: redis.Redis
) -> None:
    database_url = items.url.render_as_string(hide_password=False)
    clients_before = int(redis_client.info("clients")["connected_clients"])
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results: list[tuple[int, int, int, list[str]]] = []

    def thread_work(seed: int) -> None:
        results.append(work(database_url, redis_url, SECONDS, seed))

    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    with context.Pool(4) as pool:
        pending = pool.starmap_async(
            work, [(database_url, redis_url, SECONDS, seed) for seed in range(4)]
        )
        threads = [threading.Thread(target=thread_work, args=(10 + n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.extend(pending.get(timeout=SECONDS + 120))
    elapsed = time.monotonic() - started
    commits = sum(r[0] for r in results)
    keys = sum(r[1] for r in results)
    lock_timeouts = sum(r[2] for r in results)
    errors = [error for r in results for error in r[3]]
    print(
        f"\n8 workers, {elapsed:.1f} s: {commits} commits ({commits / elapsed:.0f}/s), "
        f"{keys} keys ({keys / elapsed:.0f}/s), {len(errors)} errors, "
        f"{lock_timeouts} SQLite lock timeouts"
    )
    assert errors == []
    assert lock_timeouts < commits / 20, "SQLite may time out a writer, rarely"
    assert commits > 0
    assert keys >= 5 * commits
    time.sleep(0.2)
    clients_after = int(redis_client.info("clients")["connected_clients"])
    assert clients_after <= clients_before + 1, "connections were returned"
    memory_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory_before
    assert memory_growth_kib < 100_000, f"memory grew by {memory_growth_kib} KiB"
