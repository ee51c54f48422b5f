"""One process of ``python -m benchmarks.cpu``: alkey's CPU per call, for one source tree.

Run as a script with the tree's ``src`` first on ``PYTHONPATH``; prints one JSON object.
It uses only names every alkey 1.0 tree has (``alkey.bind``, ``CacheKeyGenerator``,
``RedisTokenStore``), so that trees from before and after a change can be compared.

Usage: ``python cpu_worker.py REDIS_URL CALLS``
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import redis
from sqlalchemy import Engine, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisTokenStore


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "cpu_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def per_call(calls: int, batches: int = 9, **operations: Callable[[], object]) -> dict[str, float]:
    """CPU seconds per call of each operation: the median over ``batches``, the batches of
    the operations interleaved so that drift of the machine hits them alike."""
    for call in operations.values():
        call()  # warm: scripts loaded, tokens created, caches filled
    results: dict[str, list[float]] = {name: [] for name in operations}
    for _ in range(batches):
        for name, call in operations.items():
            start = time.process_time()
            for _ in range(calls):
                call()
            results[name].append((time.process_time() - start) / calls)
    return {name: statistics.median(values) for name, values in results.items()}


def _seeded_engine() -> Engine:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Item(name="x") for _ in range(1000)])
        session.commit()
    return engine


def main() -> None:
    redis_url, calls = sys.argv[1], int(sys.argv[2])
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    # An engine each: a bound session makes alkey listen on its engine, which must not
    # charge "plain" for alkey's engine listeners. In memory: a file's fsync would add
    # system time that varies far more than alkey's.
    plain = sessionmaker(_seeded_engine(), expire_on_commit=False)
    bound = sessionmaker(_seeded_engine(), expire_on_commit=False)
    alkey.bind(bound, tokens=RedisTokenStore(client))
    key = CacheKeyGenerator(client)

    with plain() as session:
        items = session.scalars(select(Item).order_by(Item.id)).all()
        one, ten = (items[0], "fragment"), (*items[:10], "fragment")
        thousand = (*items, "fragment")
        keys = per_call(calls, one=lambda: key(*one), ten=lambda: key(*ten))
        keys.update(per_call(max(calls // 40, 5), thousand=lambda: key(*thousand)))

    def commit_rows(factory: sessionmaker[Session], rows: int) -> Callable[[], None]:
        session = factory()
        loaded = session.scalars(select(Item).order_by(Item.id).limit(rows)).all()
        counter = iter(range(10**9))

        def commit() -> None:
            value = f"n{next(counter)}"
            for item in loaded:
                item.name = value
            session.commit()

        return commit

    def read_only(factory: sessionmaker[Session]) -> Callable[[], None]:
        def transaction() -> None:
            with factory() as session:
                session.scalars(select(Item).limit(1)).all()
                session.commit()

        return transaction

    commits = per_call(
        max(calls // 4, 10), alkey=commit_rows(bound, 1), plain=commit_rows(plain, 1)
    )
    hundred = per_call(
        max(calls // 40, 5), alkey=commit_rows(bound, 100), plain=commit_rows(plain, 100)
    )
    reads = per_call(max(calls // 2, 10), alkey=read_only(bound), plain=read_only(plain))
    results = {
        "key, 1 instance": keys["one"],
        "key, 10 instances": keys["ten"],
        "key, 1000 instances": keys["thousand"],
        "one-row commit: alkey's share": commits["alkey"] - commits["plain"],
        "100-row commit: alkey's share": hundred["alkey"] - hundred["plain"],
        "read-only transaction: alkey's share": reads["alkey"] - reads["plain"],
        "one-row commit, no alkey": commits["plain"],
        "read-only transaction, no alkey": reads["plain"],
    }
    print(json.dumps({"alkey": alkey.__file__, "cpu": results}))


if __name__ == "__main__":
    main()
