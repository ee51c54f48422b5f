"""One token store per Redis connection pool, living exactly as long as the pool."""

from __future__ import annotations

import gc
import weakref

import redis

from alkey.cache import CacheKeyGenerator
from alkey.tokens import RedisTokenStore, shared_store, store_for


def test_store_for_returns_the_store_configured_on_the_same_pool(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    configured = RedisTokenStore(client, key_prefix="app1:")
    sibling = redis.Redis(connection_pool=client.connection_pool)
    assert store_for(sibling) is configured
    assert CacheKeyGenerator(sibling).tokens is configured
    other = redis.Redis.from_url(redis_url, socket_timeout=2)
    assert store_for(other) is not configured
    client.close()
    other.close()


def test_a_dropped_client_releases_its_pool_and_its_store(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    store = RedisTokenStore(client)
    store.fetch(["alkey:users#1"])  # a connection in the pool
    pool, kept = weakref.ref(client.connection_pool), weakref.ref(store)
    client.connection_pool.disconnect()  # its sockets closed; its objects still referenced
    del client, store
    gc.collect()
    assert pool() is None
    assert kept() is None


def _never() -> RedisTokenStore:
    raise AssertionError("a store was shared: none should have been made")


class _SlottedKey:
    """A share key that takes no attributes (as a pool class with ``__slots__`` would)."""

    __slots__ = ("__weakref__",)


def test_a_key_without_attributes_shares_its_store_while_the_store_is_in_use(
    redis_url: str,
) -> None:
    key = _SlottedKey()
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    store = RedisTokenStore(client)
    store._share_through(key)
    assert shared_store(key, RedisTokenStore, _never) is store
    kept = weakref.ref(store)
    del store, client
    gc.collect()
    assert kept() is None
    made: list[RedisTokenStore] = []

    def make() -> RedisTokenStore:
        made.append(RedisTokenStore(redis.Redis.from_url(redis_url, socket_timeout=2)))
        return made[-1]

    assert shared_store(key, RedisTokenStore, make) is made[0]
