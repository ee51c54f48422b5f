"""Real services for the tests: a private redis-server, and SQLite or PostgreSQL.

What the tests share lives in :mod:`tests.support`, one module per concern; this module
registers its fixtures and hooks with pytest, and re-exports every helper so that
``from .conftest import ...`` keeps working:

* :mod:`tests.support.servers` -- the session's redis-server (or ``ALKEY_TEST_REDIS_URL``),
  a client of it on an empty database per test, and ``REDIS_URL`` for the default client;
* :mod:`tests.support.databases` -- ``ALKEY_TEST_DATABASE_URL`` (e.g.
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``), else a SQLite file, with freshly
  created tables per test, and its asyncio engine;
* :mod:`tests.support.flavours` -- ``pytest.mark.flavours("sync", "asyncio")`` runs a
  module's tests that use ``session``, ``sessions`` or ``key_generator`` with a sync
  Session and ``redis.Redis``, and with an AsyncSession and ``redis.asyncio`` on an event
  loop of the test's own, behind the same synchronous face (:class:`SessionAPI`);
* :mod:`tests.support.docs` -- running the examples of the README and the docs;
* :mod:`tests.support.inspection` -- what the log and Redis hold after a test;
* :mod:`tests.support.stores` -- the store kinds of the store contract
  (``tests/test_store_contract.py``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from alkey.pytest_plugin import alkey_redis

from .support.databases import (
    DATABASE_URL,
    ada,
    async_database_url,
    async_engine,
    engine,
    tables,
)
from .support.docs import (
    README,
    docs_directory,
    python_blocks,
    readme_section,
    run_python_examples,
)
from .support.flavours import (
    FLAVOURS,
    AsyncSavepointDriver,
    AsyncSessionDriver,
    KeyGenerator,
    SavepointAPI,
    SessionAPI,
    Sessions,
    async_redis_client,
    flavour,
    key_generator,
    loop,
    pytest_configure,
    pytest_generate_tests,
    session,
    session_factory,
    sessions,
    sync_session_of,
)
from .support.inspection import (
    command_calls,
    commands_processed,
    one_incident,
    set_calls,
    stored,
    token_keys,
    tokens_of,
)
from .support.servers import environment_redis, redis_client, redis_url
from .support.stores import open_store

__all__ = [
    "DATABASE_URL",
    "FLAVOURS",
    "README",
    "AsyncSavepointDriver",
    "AsyncSessionDriver",
    "KeyGenerator",
    "SavepointAPI",
    "SessionAPI",
    "Sessions",
    "ada",
    "alkey_redis",
    "async_database_url",
    "async_engine",
    "async_redis_client",
    "command_calls",
    "commands_processed",
    "docs_directory",
    "engine",
    "environment_redis",
    "flavour",
    "key_generator",
    "loop",
    "one_incident",
    "open_store",
    "pytest_configure",
    "pytest_generate_tests",
    "pytest_report_header",
    "python_blocks",
    "readme_section",
    "redis_client",
    "redis_url",
    "run_python_examples",
    "session",
    "session_factory",
    "sessions",
    "set_calls",
    "stored",
    "sync_session_of",
    "tables",
    "token_keys",
    "tokens_of",
]


def pytest_report_header() -> list[str]:
    database = DATABASE_URL or "SQLite (temporary file)"
    redis_url = os.environ.get("ALKEY_TEST_REDIS_URL") or "a private redis-server"
    return [f"alkey: database {database}; Redis {redis_url}"]


@pytest.fixture(autouse=True)
def no_replays_left_behind() -> Iterator[None]:
    """Stop the background replays that a test's stores leave running.

    A store whose bumps could not reach Redis keeps them and replays them from a thread
    until Redis answers: nothing is lost. A test that stopped its Redis, or gave a store
    a wrong password, leaves that thread probing a server that never comes back -- every
    ``retry_interval``, every 10 ms at ``retry_interval=0`` -- for the rest of the
    session. Hundreds of them took the test process's CPU and made timing-bound tests
    fail. After each test, the kept bumps of the stores whose replay it started are
    dropped (a test's own reach into the outage ledger), so their threads end.
    """
    before = {thread for thread in threading.enumerate() if thread.name == "alkey-replay"}
    yield
    for thread in threading.enumerate():
        if thread.name != "alkey-replay" or thread in before:
            continue
        store = getattr(getattr(thread, "_target", None), "__self__", None)
        outage = getattr(store, "outage", None)
        if outage is not None:
            with outage._lock:
                outage._pending.clear()
