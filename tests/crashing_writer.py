"""A writer process that dies between its database COMMIT and alkey's bump.

``python -m tests.crashing_writer DATABASE_URL REDIS_URL PATH DURABLE LEASE NAME``
renames user 1 to ``NAME`` and kills itself with SIGKILL right after the COMMIT returned,
before alkey could bump: through a bound Session (``PATH`` = ``session``) or through Core
SQL on a bound engine (``PATH`` = ``core``). ``DURABLE`` is ``1`` or ``0``.

SIGKILL, not an exception: nothing in the process -- no ``finally``, no atexit hook, no
socket buffer -- gets a chance to finish the bump.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import redis
from sqlalchemy import create_engine, event, text
from sqlalchemy.orm import sessionmaker

import alkey
from alkey.tokens import RedisTokenStore

from .models import User


def die(*args: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(database_url: str, redis_url: str, path: str, durable: str, lease: str, name: str) -> None:
    engine = create_engine(database_url)
    store = RedisTokenStore(
        redis.Redis.from_url(redis_url), durable=durable == "1", lease=float(lease)
    )
    if path == "session":
        factory = sessionmaker(engine)
        alkey.bind(factory, tokens=store)
        # After alkey's own after_commit listener, before its bump (after_transaction_end).
        event.listen(factory, "after_commit", die)
        with factory() as session:
            session.get_one(User, 1).name = name
            session.commit()
    elif path == "core":
        commit = engine.dialect.do_commit

        def commit_then_die(dbapi_connection: Any) -> None:
            commit(dbapi_connection)
            die()

        # Wrapped before alkey wraps it, so alkey's bump would run after this returns.
        engine.dialect.do_commit = commit_then_die  # type: ignore[method-assign]
        alkey.bind_engine(engine, tokens=store)
        with engine.begin() as connection:
            connection.execute(text("UPDATE users SET name = :name WHERE id = 1"), {"name": name})
    raise SystemExit(f"{path}: the writer should have died at its COMMIT")


if __name__ == "__main__":
    main(*sys.argv[1:])
