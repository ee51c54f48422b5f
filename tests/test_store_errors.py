"""Under ``on_error="raise"`` a store raises alkey's errors, whatever the client library.

An application catches :class:`~alkey.errors.TokenStoreError` and its kinds, not
redis-py's exceptions; redis-py's error is the ``__cause__``, and the errors still
subclass redis-py's ``RedisError`` (and ``ConnectionError`` for an unreachable store), so
code written against the first releases keeps working. All against real servers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio
from redis.exceptions import NoPermissionError

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis
from alkey.errors import (
    AlkeyError,
    TokenStoreError,
    TokenStorePoolExhaustedError,
    TokenStoreUnavailableError,
)
from alkey.tokens import RedisClient, RedisTokenStore

from .support.pools import is_pool_exhausted, take_connection


def refused_url() -> str:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def quick(url: str, **options: object) -> RedisClient:
    client: RedisClient = redis.Redis.from_url(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None, **options
    )
    return client


def test_an_unreachable_redis_raises_alkeys_unavailable_error_caused_by_redis_pys() -> None:
    client = quick(refused_url())
    store = RedisTokenStore(client, on_error="raise")
    for call in (lambda: store.fetch(["alkey:users#1"]), lambda: store.bump(["alkey:users#1"])):
        with pytest.raises(TokenStoreUnavailableError) as raised:
            call()
        assert isinstance(raised.value.__cause__, redis.ConnectionError)
        assert not isinstance(raised.value, TokenStorePoolExhaustedError)
        # Still redis-py's errors, for code that caught those.
        assert isinstance(raised.value, redis.RedisError)
        assert isinstance(raised.value, redis.ConnectionError)
        assert isinstance(raised.value, AlkeyError)
        assert str(raised.value) == str(raised.value.__cause__)
    client.close()


def test_the_asyncio_store_raises_the_same_errors() -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(
            refused_url(), socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
        )
        store = AsyncRedisTokenStore(client, on_error="raise")
        with pytest.raises(TokenStoreUnavailableError) as raised:
            await store.afetch(["alkey:users#1"])
        assert isinstance(raised.value.__cause__, redis.ConnectionError)
        with pytest.raises(redis.RedisError):
            await store.abump(["alkey:users#1"])
        await client.aclose()

    asyncio.run(main())


def test_a_pool_without_a_free_connection_raises_a_distinct_error(redis_url: str) -> None:
    client = quick(redis_url, max_connections=1)
    store = RedisTokenStore(client, on_error="raise")
    held = take_connection(client.connection_pool)
    with pytest.raises(TokenStorePoolExhaustedError) as raised:
        store.bump(["alkey:users#1"])
    assert is_pool_exhausted(raised.value.__cause__)
    assert isinstance(raised.value, TokenStoreUnavailableError), "a kind of unavailability"
    client.connection_pool.release(held)
    assert store.fetch(["alkey:users#1"]), "and the next call goes through"
    client.close()


def test_a_blocking_pool_that_times_out_raises_the_pool_exhausted_error(redis_url: str) -> None:
    pool = redis.BlockingConnectionPool.from_url(
        redis_url, max_connections=1, timeout=0.05, socket_timeout=0.3
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisTokenStore(client, on_error="raise")
    held = take_connection(pool)
    with pytest.raises(TokenStorePoolExhaustedError) as raised:
        store.fetch(["alkey:users#1"])
    assert isinstance(raised.value.__cause__, redis.ConnectionError)
    pool.release(held)  # type: ignore[no-untyped-call]
    client.close()


def test_the_asyncio_pool_exhausted_error_is_distinct_too(redis_url: str) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_url, max_connections=1, socket_timeout=0.1)
        store = AsyncRedisTokenStore(client, on_error="raise")
        held = await take_connection(client.connection_pool)
        with pytest.raises(TokenStorePoolExhaustedError) as raised:
            await store.afetch(["alkey:users#1"])
        assert is_pool_exhausted(raised.value.__cause__)
        await client.connection_pool.release(held)
        assert await store.afetch(["alkey:users#1"])
        await client.aclose()

    asyncio.run(main())


@pytest.fixture
def no_eval_user(redis_client: RedisClient) -> Iterator[str]:
    """A Redis user that may not run scripts: Redis answers, and refuses."""
    rules = ["on", ">s3cret-acl", "~*", "+@all", "-eval", "-evalsha"]
    redis_client.execute_command("ACL", "SETUSER", "noeval", *rules)  # type: ignore[no-untyped-call]
    yield "noeval:s3cret-acl"
    redis_client.execute_command("ACL", "DELUSER", "noeval")  # type: ignore[no-untyped-call]


def test_a_refusal_from_a_reachable_redis_is_a_store_error_not_unavailability(
    redis_url: str, no_eval_user: str
) -> None:
    host_port = redis_url.removeprefix("redis://")
    client = quick(f"redis://{no_eval_user}@{host_port}")
    store = RedisTokenStore(client, on_error="raise")
    with pytest.raises(TokenStoreError) as raised:
        store.fetch(["alkey:users#1"])
    assert isinstance(raised.value.__cause__, NoPermissionError)
    assert not isinstance(raised.value, TokenStoreUnavailableError)
    assert isinstance(raised.value, redis.RedisError)
    client.close()


def test_a_read_only_replica_raises_the_unavailable_error() -> None:
    with EmbeddedRedis() as primary:
        replica_args = ("--replicaof", "127.0.0.1", str(primary.port))
        with EmbeddedRedis(extra_args=replica_args) as replica:
            client = quick(replica.url)
            store = RedisTokenStore(client, on_error="raise")
            with pytest.raises(TokenStoreUnavailableError) as raised:
                store.bump(["alkey:users#1"])
            assert isinstance(raised.value.__cause__, redis.ReadOnlyError)
            client.close()


def test_under_the_degrade_policy_the_same_failures_raise_nothing() -> None:
    client = quick(refused_url())
    store = RedisTokenStore(client)
    assert len(store.fetch(["alkey:users#1"])) == 1, "a miss, no exception"
    assert store.outage.skip(), "Redis is marked down instead"
    client.close()


#: What redis-py before 7.4 put in a Sentinel ``MasterNotFoundError``: each sentinel
#: client's repr, with its connection's password.
LEAKY_MESSAGE = (
    "No master found for 'svc' : <redis.client.Redis(<redis.connection.ConnectionPool("
    "<redis.connection.Connection(db=0,username=None,password=S3NT1NEL-PW,socket_timeout=2)"
    ">)>)>, {'password': 'PR1MARY-PW', 'port': 26379}"
)


def test_a_password_in_a_client_libraries_error_message_is_masked_in_alkeys_error_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """alkey raises and logs its client library's messages; whatever one prints of a
    connection, no password gets through (``alkey.errors.redacted``)."""
    from alkey.observers import LoggingObserver
    from alkey.transports import store_error

    cause = redis.exceptions.ConnectionError(LEAKY_MESSAGE)
    error = store_error(cause)
    error.__cause__ = cause
    assert isinstance(error, TokenStoreUnavailableError)
    assert "S3NT1NEL-PW" not in str(error)
    assert "PR1MARY-PW" not in str(error)
    assert "password=***" in str(error), "says what was there"
    with caplog.at_level("WARNING", logger="alkey"):
        LoggingObserver().outage_began(
            action="fetch tokens", error=error, pending=0, dropped=0, max_pending=1
        )
    assert "No master found for 'svc'" in caplog.text
    assert "S3NT1NEL-PW" not in caplog.text
    assert "PR1MARY-PW" not in caplog.text
