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
from sqlalchemy import String, create_engine, select
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


def main() -> None:
    redis_url, calls = sys.argv[1], int(sys.argv[2])
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    # In memory: a file's fsync would add system time that varies far more than alkey's.
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Item(name="x") for _ in range(10)])
        session.commit()

    plain = sessionmaker(engine, expire_on_commit=False)
    bound = sessionmaker(engine, expire_on_commit=False)
    alkey.bind(bound, tokens=RedisTokenStore(client))
    key = CacheKeyGenerator(client)

    with plain() as session:
        items = session.scalars(select(Item).order_by(Item.id)).all()
        one, ten = (items[0], "fragment"), (*items, "fragment")
        keys = per_call(calls, one=lambda: key(*one), ten=lambda: key(*ten))

    def commit_one_row(factory: sessionmaker[Session]) -> Callable[[], None]:
        session = factory()
        item = session.get(Item, 1)
        assert item is not None
        counter = iter(range(10**9))

        def commit() -> None:
            item.name = f"n{next(counter)}"
            session.commit()

        return commit

    commits = per_call(
        max(calls // 4, 10), alkey=commit_one_row(bound), plain=commit_one_row(plain)
    )
    results = {
        "key, 1 instance": keys["one"],
        "key, 10 instances": keys["ten"],
        "one-row commit: alkey's share": commits["alkey"] - commits["plain"],
        "one-row commit, no alkey": commits["plain"],
    }
    print(json.dumps({"alkey": alkey.__file__, "cpu": results}))


if __name__ == "__main__":
    main()
