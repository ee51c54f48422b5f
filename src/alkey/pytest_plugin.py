"""pytest fixtures for applications that cache with alkey: a Redis for their tests.

Load it with ``pytest -p alkey.pytest_plugin``, or ``pytest_plugins =
["alkey.pytest_plugin"]`` in your top-level ``conftest.py``. It only adds fixtures, all
named ``alkey_*``, and starts nothing until a test asks for one (see :mod:`alkey.testing`
for what each gives):

* ``alkey_redis`` (session) -- the URL of a private redis-server, or of
  ``ALKEY_TEST_REDIS_URL`` if that is set (its database is flushed before each test that
  uses ``alkey_redis_client``!);
* ``alkey_redis_client`` -- a ``redis.Redis`` of it, on a database flushed for the test;
* ``alkey_store`` -- the :class:`~alkey.tokens.RedisTokenStore` of that client;
* ``alkey_private_redis`` -- an :class:`~alkey.embedded.EmbeddedRedis` of the test's own,
  to stop, pause and start again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from alkey.testing import EmbeddedRedis
from alkey.tokens import RedisClient, RedisTokenStore

__all__ = ["alkey_private_redis", "alkey_redis", "alkey_redis_client", "alkey_store"]

#: Names an existing Redis for the tests instead of a private redis-server.
EXTERNAL_REDIS = "ALKEY_TEST_REDIS_URL"


@pytest.fixture(scope="session")
def alkey_redis() -> Iterator[str]:
    """The URL of the session's Redis: a private redis-server on a free port, started on
    first use and stopped after the last test; or ``$ALKEY_TEST_REDIS_URL``."""
    external = os.environ.get(EXTERNAL_REDIS)
    if external:
        yield external
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def alkey_redis_client(alkey_redis: str) -> Iterator[RedisClient]:
    """A client of ``alkey_redis`` on a database flushed for this test (bounded by a 2 s
    socket timeout, like alkey's default client), closed after it."""
    client: RedisClient = redis.Redis.from_url(alkey_redis, socket_timeout=2)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def alkey_store(alkey_redis_client: RedisClient) -> RedisTokenStore:
    """A token store on ``alkey_redis_client`` with the default options; also what
    ``store_for(alkey_redis_client)`` returns, and so what ``CacheKeyGenerator(client)``
    and ``alkey.bind(..., redis_client=client)`` use."""
    return RedisTokenStore(alkey_redis_client)


@pytest.fixture
def alkey_private_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, running, stopped after the test: ``stop()``,
    ``pause()``, ``resume()`` and ``start()`` it to see what your application does when
    Redis fails; ``.url`` to connect."""
    with EmbeddedRedis() as server:
        yield server
