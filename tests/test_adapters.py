"""The adapters (alkey.adapters.*) against the real libraries: dogpile.cache, Flask-Caching,
aiocache and cashews, on the test Redis and the test database.

Each adapter serves a fresh value after a commit of a row its function read; dogpile's
default key generator, as the control, serves the stale one.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiocache  # type: ignore[import-untyped]
import cashews
import pytest
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion
from flask import Flask
from flask_caching import Cache as FlaskCache
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import alkey
import alkey.asyncio
from alkey.adapters import aiocache as alkey_aiocache
from alkey.adapters import cashews as alkey_cashews
from alkey.adapters.dogpile import function_key_generator, function_multi_key_generator
from alkey.adapters.flask_caching import make_cache_key, memoize
from alkey.asyncio import AsyncCacheKeyGenerator, AsyncRedisClient
from alkey.keys import CacheKeyGenerator
from alkey.tokens import RedisClient

from .conftest import commands_processed
from .models import User


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client, prefix="test:")


@pytest.fixture
def users(ada: Any, session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Bound sessions over a database holding user 1, 'ada'."""
    with session_factory.begin() as session:
        session.add(User(id=2, name="grace"))
    return session_factory


def rename(users: sessionmaker[Session], name: str, user_id: int = 1) -> None:
    with users.begin() as writer:
        writer.get_one(User, user_id).name = name


@pytest.fixture
def region(keys: CacheKeyGenerator) -> CacheRegion:
    """A dogpile.cache region whose decorators key with alkey."""
    return make_region(
        function_key_generator=functools.partial(function_key_generator, key_generator=keys),
        function_multi_key_generator=functools.partial(
            function_multi_key_generator, key_generator=keys
        ),
    ).configure("dogpile.cache.memory")


@pytest.fixture
def async_keys(async_redis_client: AsyncRedisClient) -> AsyncCacheKeyGenerator:
    return AsyncCacheKeyGenerator(async_redis_client, prefix="test:")


@pytest.fixture
def async_users(
    ada: Any, async_engine: AsyncEngine, async_redis_client: AsyncRedisClient
) -> Iterator[async_sessionmaker[Any]]:
    """Bound AsyncSessions, on redis.asyncio, over a database holding user 1, 'ada'."""
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.bind(maker, tokens=alkey.asyncio.store_for(async_redis_client))
    yield maker
    alkey.unbind(maker)


# -- dogpile.cache -----------------------------------------------------------------------------


def test_dogpile_default_key_generator_serves_a_stale_value_after_a_commit(
    users: sessionmaker[Session],
) -> None:
    """The control: what function_key_generator is for."""
    default_keys = make_region().configure("dogpile.cache.memory")

    @default_keys.cache_on_arguments()
    def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == "<p>ada</p>"
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p>ada</p>"  # stale: the same str(user), the same key


def test_dogpile_function_key_generator_serves_a_fresh_value_after_a_commit(
    users: sessionmaker[Session], region: CacheRegion
) -> None:
    calls: list[str] = []

    @region.cache_on_arguments(namespace="cards")
    def card(user: User, *, size: str = "full") -> str:
        calls.append(user.name)
        return f"<p class={size}>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == card(user) == "<p class=full>ada</p>"
        assert card(user, size="small") == "<p class=small>ada</p>"  # keyword arguments work
        assert calls == ["ada", "ada"]
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p class=full>Ada Lovelace</p>"
        assert calls == ["ada", "ada", "Ada Lovelace"]


def test_dogpile_function_key_generator_keys_a_loaded_instance_apart_from_fresh_data(
    users: sessionmaker[Session], region: CacheRegion
) -> None:
    @region.cache_on_arguments()
    def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    with users() as reader:
        loaded = reader.get_one(User, 1)
        rename(users, "Ada Lovelace")  # commits between the reader's load and its key
        assert card(loaded) == "<p>ada</p>"
    with users() as fresh:
        assert card(fresh.get_one(User, 1)) == "<p>Ada Lovelace</p>"


def test_dogpile_decorated_functions_invalidate_and_set_through_the_alkey_key(
    users: sessionmaker[Session], region: CacheRegion
) -> None:
    class Cards:
        @region.cache_on_arguments()
        def card(self, user: User) -> str:
            return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        cards = Cards()
        assert cards.card(user) == "<p>ada</p>"
        Cards.card.set("<p>set by hand</p>", cards, user)  # type: ignore[attr-defined]
        assert cards.card(user) == "<p>set by hand</p>"
        Cards.card.invalidate(cards, user)  # type: ignore[attr-defined]
        assert cards.card(user) == "<p>ada</p>"


def test_dogpile_function_multi_key_generator_serves_fresh_values_after_a_commit(
    users: sessionmaker[Session], region: CacheRegion, redis_client: RedisClient
) -> None:
    calls: list[str] = []

    @region.cache_multi_on_arguments()
    def cards(*users: User) -> list[str]:
        calls.extend(user.name for user in users)
        return [f"<p>{user.name}</p>" for user in users]

    with users() as session:
        ada, grace = session.get_one(User, 1), session.get_one(User, 2)
        assert cards(ada, grace) == ["<p>ada</p>", "<p>grace</p>"]
        assert cards(ada, grace) == ["<p>ada</p>", "<p>grace</p>"]
        assert sorted(calls) == ["ada", "grace"]
        ada.name = "Ada Lovelace"
        session.commit()
        assert cards(ada, grace) == ["<p>Ada Lovelace</p>", "<p>grace</p>"]
        assert sorted(calls) == ["Ada Lovelace", "ada", "grace"]  # only the written row again

        # All the keys of one call in one round trip, as one key costs.
        generate = function_multi_key_generator(
            None, cards, key_generator=CacheKeyGenerator(redis_client)
        )
        before = commands_processed(redis_client)
        CacheKeyGenerator(redis_client)(ada)
        one_key = commands_processed(redis_client) - before
        before = commands_processed(redis_client)
        assert len(set(generate(ada, grace))) == 2
        assert commands_processed(redis_client) - before == one_key


def test_dogpile_with_a_redis_backend_and_a_distributed_lock_computes_once(
    users: sessionmaker[Session], keys: CacheKeyGenerator, redis_url: str
) -> None:
    url = urlsplit(redis_url)
    region = make_region(
        function_key_generator=functools.partial(function_key_generator, key_generator=keys)
    ).configure(
        "dogpile.cache.redis",
        arguments={
            "host": url.hostname,
            "port": url.port,
            "db": int(url.path.lstrip("/") or 0),
            "distributed_lock": True,  # the lock is in Redis: one computation per key, anywhere
            "lock_timeout": 10,
            "thread_local_lock": False,
        },
    )
    calls: list[str] = []

    @region.cache_on_arguments()
    def card(user: User) -> str:
        calls.append(user.name)
        time.sleep(0.2)
        return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        start = threading.Barrier(4)
        results: list[str] = []

        def reader() -> None:
            start.wait()
            results.append(card(user))

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == ["<p>ada</p>"] * 4
        assert calls == ["ada"]
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p>Ada Lovelace</p>"
    region.backend.writer_client.close()


# -- Flask-Caching -----------------------------------------------------------------------------


@pytest.fixture
def flask_cache() -> Iterator[FlaskCache]:
    app = Flask(__name__)
    cache = FlaskCache(app, config={"CACHE_TYPE": "SimpleCache", "CACHE_DEFAULT_TIMEOUT": 60})
    with app.app_context():
        yield cache


def test_flask_caching_memoize_serves_a_fresh_value_after_a_commit(
    users: sessionmaker[Session], keys: CacheKeyGenerator, flask_cache: FlaskCache
) -> None:
    calls: list[str] = []

    @memoize(flask_cache, key_generator=keys, timeout=300)
    def card(user: User, size: str = "full") -> str:
        calls.append(user.name)
        return f"<p class={size}>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == card(user) == "<p class=full>ada</p>"
        assert calls == ["ada"]
        assert flask_cache.get(card.make_cache_key(user)) == "<p class=full>ada</p>"
        assert card.make_cache_key(user, "small") == card.make_cache_key(user, size="small")
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p class=full>Ada Lovelace</p>"
        assert calls == ["ada", "Ada Lovelace"]
        assert card.uncached(user) == "<p class=full>Ada Lovelace</p>"
        flask_cache.delete(card.make_cache_key(user))
        assert card(user) == "<p class=full>Ada Lovelace</p>"
        assert calls == ["ada", "Ada Lovelace", "Ada Lovelace", "Ada Lovelace"]


def test_flask_caching_cached_with_alkeys_make_cache_key_serves_a_fresh_value_after_a_commit(
    users: sessionmaker[Session], keys: CacheKeyGenerator, flask_cache: FlaskCache
) -> None:
    calls: list[str] = []

    @flask_cache.cached(timeout=300, make_cache_key=make_cache_key("card", key_generator=keys))
    def card(user: User) -> str:
        calls.append(user.name)
        return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == card(user) == "<p>ada</p>"
        assert calls == ["ada"]
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p>Ada Lovelace</p>"
        assert calls == ["ada", "Ada Lovelace"]


def test_flask_caching_memoize_keys_a_loaded_instance_apart_from_fresh_data(
    users: sessionmaker[Session], keys: CacheKeyGenerator, flask_cache: FlaskCache
) -> None:
    @memoize(flask_cache, key_generator=keys)
    def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    with users() as reader:
        loaded = reader.get_one(User, 1)
        rename(users, "Ada Lovelace")
        assert card(loaded) == "<p>ada</p>"
    with users() as fresh:
        assert card(fresh.get_one(User, 1)) == "<p>Ada Lovelace</p>"


# -- aiocache and cashews ----------------------------------------------------------------------


def test_aiocache_cached_serves_a_fresh_value_after_a_commit(
    async_users: async_sessionmaker[Any],
    async_keys: AsyncCacheKeyGenerator,
    redis_url: str,
    loop: asyncio.AbstractEventLoop,
) -> None:
    url = urlsplit(redis_url)
    cache = aiocache.RedisCache(
        endpoint=url.hostname,
        port=url.port,
        db=int(url.path.lstrip("/") or 0),
        serializer=aiocache.serializers.PickleSerializer(),
    )
    calls: list[str] = []

    @alkey_aiocache.cached(cache, key_generator=async_keys, ttl=300)
    async def card(user: User) -> str:
        calls.append(user.name)
        return f"<p>{user.name}</p>"

    async def scenario() -> None:
        async with async_users() as session:
            user = await session.get_one(User, 1)
            assert await card(user) == await card(user) == "<p>ada</p>"
            assert calls == ["ada"]
            assert await cache.get(await card.key(user)) == "<p>ada</p>"
            user.name = "Ada Lovelace"
            await session.commit()
            assert await card(user) == "<p>Ada Lovelace</p>"
            assert calls == ["ada", "Ada Lovelace"]
        with warnings.catch_warnings():  # aiocache closes its redis.asyncio client with close()
            warnings.simplefilter("ignore", DeprecationWarning)
            await cache.close()

    loop.run_until_complete(scenario())


def test_cashews_cached_serves_a_fresh_value_after_a_commit(
    async_users: async_sessionmaker[Any],
    async_keys: AsyncCacheKeyGenerator,
    redis_url: str,
    loop: asyncio.AbstractEventLoop,
) -> None:
    cache = cashews.Cache()
    cache.setup(redis_url)
    calls: list[str] = []

    @alkey_cashews.cached(cache, key_generator=async_keys, ttl=300)
    async def card(user: User) -> str:
        calls.append(user.name)
        return f"<p>{user.name}</p>"

    async def scenario() -> None:
        async with async_users() as session:
            user = await session.get_one(User, 1)
            assert await card(user) == await card(user) == "<p>ada</p>"
            assert calls == ["ada"]
            assert await cache.get(await card.key(user)) == "<p>ada</p>"
            user.name = "Ada Lovelace"
            await session.commit()
            assert await card(user) == "<p>Ada Lovelace</p>"
            assert calls == ["ada", "Ada Lovelace"]
        with warnings.catch_warnings():  # cashews closes its redis.asyncio client with close()
            warnings.simplefilter("ignore", DeprecationWarning)
            await cache.close()

    loop.run_until_complete(scenario())


def test_an_async_adapter_keys_a_loaded_instance_apart_from_fresh_data(
    async_users: async_sessionmaker[Any],
    async_keys: AsyncCacheKeyGenerator,
    loop: asyncio.AbstractEventLoop,
) -> None:
    cache = cashews.Cache()
    cache.setup("mem://")

    @alkey_cashews.cached(cache, key_generator=async_keys)
    async def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    async def scenario() -> None:
        async with async_users() as reader:
            loaded = await reader.get_one(User, 1)
            async with async_users.begin() as writer:
                (await writer.get_one(User, 1)).name = "Ada Lovelace"
            assert await card(loaded) == "<p>ada</p>"
        async with async_users() as fresh:
            assert await card(await fresh.get_one(User, 1)) == "<p>Ada Lovelace</p>"
        await cache.close()

    loop.run_until_complete(scenario())


def test_each_async_adapter_refuses_the_other_librarys_cache(
    loop: asyncio.AbstractEventLoop,
) -> None:
    memory = aiocache.SimpleMemoryCache()
    cashews_cache = cashews.Cache()
    with pytest.raises(TypeError, match=r"is not an aiocache cache"):
        alkey_aiocache.cached(cashews_cache)
    with pytest.raises(TypeError, match=r"SimpleMemoryCache.*is not a cashews Cache"):
        alkey_cashews.cached(memory)
    loop.run_until_complete(memory.close())


def test_importing_alkey_and_the_read_through_core_imports_no_caching_library() -> None:
    # Older SQLAlchemy (2.0.24, the lowest alkey supports) imports greenlet itself:
    # only what alkey's imports add beyond SQLAlchemy's own counts.
    code = (
        "import sys, sqlalchemy, sqlalchemy.orm\n"
        "before = set(sys.modules)\n"
        "import alkey, alkey.readthrough, alkey.adapters, alkey.adapters.dogpile, "
        "alkey.adapters.flask_caching\n"
        "loaded = {'dogpile', 'flask_caching', 'aiocache', 'cashews', 'greenlet', "
        "'sqlalchemy.ext.asyncio'} & (set(sys.modules) - before)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
