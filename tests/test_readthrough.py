"""Read-through caching (alkey.readthrough, alkey.readthrough_asyncio) on real caches.

Every cache here is the real thing: a dict, the test Redis through redis-py and
redis.asyncio, a dogpile.cache region, a Flask-Caching cache, cashews and aiocache. Keys
come from alkey's key generators on the test Redis, rows from the test database.
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import aiocache  # type: ignore[import-untyped]
import cashews
import pytest
import redis
from dogpile.cache import make_region
from flask import Flask
from flask_caching import Cache as FlaskCache
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

import alkey
import alkey.asyncio
import alkey.readthrough
import alkey.readthrough_asyncio
from alkey.asyncio import AsyncCacheKeyGenerator, AsyncRedisClient
from alkey.keys import CacheKeyGenerator
from alkey.readthrough import (
    MISSING,
    CacheBackend,
    FunctionKey,
    adapt_cache,
    cached,
    get_or_create,
)
from alkey.readthrough_asyncio import (
    AsyncCacheBackend,
    acached,
    adapt_async_cache,
    aget_or_create,
)
from alkey.tokens import RedisClient

from .models import User

SYNC_CACHES = ("dict", "redis", "dogpile", "flask", "backend")
ASYNC_CACHES = ("dict", "redis.asyncio", "cashews", "aiocache", "backend")


class DictBackend(CacheBackend):
    """A cache of the application's own, declared by subclassing the protocol."""

    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.entries.get(key, MISSING)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.entries[key] = value


class AsyncDictBackend(AsyncCacheBackend):
    def __init__(self) -> None:
        self.entries: dict[str, Any] = {}

    async def get(self, key: str) -> Any:
        return self.entries.get(key, MISSING)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.entries[key] = value


class Calls:
    """A creator that counts its calls and returns what it is told."""

    def __init__(self, value: Callable[[], Any], delay: float = 0.0) -> None:
        self.value = value
        self.delay = delay
        self.count = 0

    def __call__(self) -> Any:
        self.count += 1
        time.sleep(self.delay)
        return self.value()

    async def acall(self) -> Any:
        self.count += 1
        await asyncio.sleep(self.delay)
        return self.value()


@pytest.fixture
def keys(redis_client: RedisClient) -> CacheKeyGenerator:
    return CacheKeyGenerator(redis_client, prefix="test:")


@pytest.fixture
def users(ada: Any, session_factory: sessionmaker[Session]) -> sessionmaker[Session]:
    """Bound sessions over a database holding user 1, 'ada'."""
    return session_factory


def rename(users: sessionmaker[Session], name: str) -> None:
    with users.begin() as writer:
        writer.get_one(User, 1).name = name


@pytest.fixture(params=SYNC_CACHES)
def sync_cache(request: pytest.FixtureRequest, redis_client: RedisClient) -> Iterator[object]:
    """Each kind of synchronous cache alkey adapts."""
    kind = request.param
    if kind == "dict":
        yield {}
    elif kind == "redis":
        yield redis_client
    elif kind == "dogpile":
        yield make_region().configure("dogpile.cache.memory")
    elif kind == "flask":
        app = Flask(__name__)
        flask_cache = FlaskCache(app, config={"CACHE_TYPE": "SimpleCache"})
        with app.app_context():
            yield flask_cache
    else:
        yield DictBackend()


@pytest.fixture
def async_keys(async_redis_client: AsyncRedisClient) -> AsyncCacheKeyGenerator:
    return AsyncCacheKeyGenerator(async_redis_client, prefix="test:")


@pytest.fixture(params=ASYNC_CACHES)
def async_cache(
    request: pytest.FixtureRequest,
    async_redis_client: AsyncRedisClient,
    redis_url: str,
    loop: asyncio.AbstractEventLoop,
) -> Iterator[object]:
    """Each kind of asyncio cache alkey adapts."""
    kind = request.param
    if kind == "dict":
        yield {}
    elif kind == "redis.asyncio":
        yield async_redis_client
    elif kind == "cashews":
        cache = cashews.Cache()
        cache.setup(redis_url)  # cashews' Redis backend, on the test Redis
        yield cache
        with warnings.catch_warnings():  # cashews closes its redis.asyncio client with close()
            warnings.simplefilter("ignore", DeprecationWarning)
            loop.run_until_complete(cache.close())
    elif kind == "aiocache":
        memory = aiocache.SimpleMemoryCache()
        yield memory
        loop.run_until_complete(memory.close())
    else:
        yield AsyncDictBackend()


@pytest.fixture
def async_users(
    ada: Any, async_engine: AsyncEngine, async_redis_client: AsyncRedisClient
) -> Iterator[async_sessionmaker[Any]]:
    """Bound AsyncSessions, on redis.asyncio, over a database holding user 1, 'ada'."""
    maker = async_sessionmaker(async_engine, expire_on_commit=False)
    alkey.bind(maker, tokens=alkey.asyncio.store_for(async_redis_client))
    yield maker
    alkey.unbind(maker)


async def arename(users: async_sessionmaker[Any], name: str) -> None:
    async with users.begin() as writer:
        (await writer.get_one(User, 1)).name = name


# -- fresh values after a commit ---------------------------------------------------------------


def test_a_commit_of_the_row_makes_the_decorated_function_compute_again(
    users: sessionmaker[Session], keys: CacheKeyGenerator, sync_cache: object
) -> None:
    calls = Calls(lambda: None)

    @cached(sync_cache, key_generator=keys)
    def card(user: User) -> str:
        calls.count += 1
        return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == "<p>ada</p>"
        assert card(user) == "<p>ada</p>"
        assert calls.count == 1  # the second call was a hit
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p>Ada Lovelace</p>"
        assert calls.count == 2


def test_get_or_create_serves_the_cached_value_until_a_commit_changes_the_key(
    users: sessionmaker[Session], keys: CacheKeyGenerator, sync_cache: object
) -> None:
    with users() as session:
        user = session.get_one(User, 1)
        render = Calls(lambda: f"<p>{user.name}</p>")
        assert get_or_create(sync_cache, keys(user, "card"), render) == "<p>ada</p>"
        assert get_or_create(sync_cache, keys(user, "card"), render) == "<p>ada</p>"
        assert render.count == 1
    rename(users, "Ada Lovelace")
    with users() as session:
        user = session.get_one(User, 1)
        assert get_or_create(sync_cache, keys(user, "card"), render) == "<p>Ada Lovelace</p>"
        assert render.count == 2


def test_a_value_loaded_before_a_concurrent_commit_is_never_served_after_it(
    users: sessionmaker[Session], keys: CacheKeyGenerator, sync_cache: object
) -> None:
    @cached(sync_cache, key_generator=keys)
    def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    with users() as reader:
        loaded = reader.get_one(User, 1)  # "ada"
        rename(users, "Ada Lovelace")  # commits between the reader's load and its key
        # The reader keys with the new token but the old data, computes and stores:
        assert card(loaded) == "<p>ada</p>"
        assert get_or_create(sync_cache, keys(loaded, "x"), lambda: loaded.name) == "ada"
    with users() as fresh:
        user = fresh.get_one(User, 1)
        assert card(user) == "<p>Ada Lovelace</p>"  # not the reader's stale value
        assert get_or_create(sync_cache, keys(user, "x"), lambda: user.name) == "Ada Lovelace"


def test_a_commit_makes_the_decorated_coroutine_function_compute_again(
    async_users: async_sessionmaker[Any],
    async_keys: AsyncCacheKeyGenerator,
    async_cache: object,
    loop: asyncio.AbstractEventLoop,
) -> None:
    calls = Calls(lambda: None)

    @acached(async_cache, key_generator=async_keys)
    async def card(user: User) -> str:
        calls.count += 1
        return f"<p>{user.name}</p>"

    async def scenario() -> None:
        async with async_users() as session:
            user = await session.get_one(User, 1)
            assert await card(user) == "<p>ada</p>"
            assert await card(user) == "<p>ada</p>"
            assert calls.count == 1
            user.name = "Ada Lovelace"
            await session.commit()
            assert await card(user) == "<p>Ada Lovelace</p>"
            assert calls.count == 2

    loop.run_until_complete(scenario())


def test_an_asyncio_value_loaded_before_a_concurrent_commit_is_never_served_after_it(
    async_users: async_sessionmaker[Any],
    async_keys: AsyncCacheKeyGenerator,
    async_cache: object,
    loop: asyncio.AbstractEventLoop,
) -> None:
    @acached(async_cache, key_generator=async_keys)
    async def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    async def scenario() -> None:
        async with async_users() as reader:
            loaded = await reader.get_one(User, 1)
            await arename(async_users, "Ada Lovelace")
            assert await card(loaded) == "<p>ada</p>"
            key = await async_keys(loaded, "x")
            assert await aget_or_create(async_cache, key, Calls(lambda: "ada").acall) == "ada"
        async with async_users() as fresh:
            user = await fresh.get_one(User, 1)
            assert await card(user) == "<p>Ada Lovelace</p>"
            key = await async_keys(user, "x")
            fresh_name = Calls(lambda: user.name).acall
            assert await aget_or_create(async_cache, key, fresh_name) == "Ada Lovelace"

    loop.run_until_complete(scenario())


def test_the_default_key_generator_is_the_environments_and_changes_with_a_commit(
    users: sessionmaker[Session], redis_url: str, environment_redis: Callable[[str], None]
) -> None:
    environment_redis(redis_url)
    cache: dict[str, str] = {}

    @cached(cache)
    def card(user: User) -> str:
        return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert card(user) == "<p>ada</p>"
        user.name = "Ada Lovelace"
        session.commit()
        assert card(user) == "<p>Ada Lovelace</p>"
        assert len(cache) == 2


# -- values and keys ---------------------------------------------------------------------------


def test_none_is_cached_as_a_value(keys: CacheKeyGenerator, sync_cache: object) -> None:
    nothing = Calls(lambda: None)
    key = keys("alkey:users#1", "lookup")
    assert get_or_create(sync_cache, key, nothing) is None
    assert get_or_create(sync_cache, key, nothing) is None
    assert nothing.count == 1
    assert adapt_cache(sync_cache).get(key) is None
    assert adapt_cache(sync_cache).get(keys("alkey:users#2", "lookup")) is MISSING


def test_none_is_cached_as_a_value_in_asyncio_caches(
    async_keys: AsyncCacheKeyGenerator, async_cache: object, loop: asyncio.AbstractEventLoop
) -> None:
    nothing = Calls(lambda: None)

    async def scenario() -> None:
        key = await async_keys("alkey:users#1", "lookup")
        assert await aget_or_create(async_cache, key, nothing.acall) is None
        assert await aget_or_create(async_cache, key, nothing.acall) is None
        assert nothing.count == 1
        backend = adapt_async_cache(async_cache)
        assert await backend.get(key) is None
        assert await backend.get(await async_keys("alkey:users#2", "lookup")) is MISSING

    loop.run_until_complete(scenario())


def test_positional_and_keyword_arguments_make_one_key_and_the_namespace_another(
    users: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    cache: dict[str, str] = {}

    @cached(cache, key_generator=keys)
    def card(user: User, size: str = "full") -> str:
        return f"{size}:{user.name}"

    @cached(cache, key_generator=keys, namespace="v2")
    def card_v2(user: User, size: str = "full") -> str:
        return f"{size}:{user.name}"

    with users() as session:
        user = session.get_one(User, 1)
        assert card.key(user, "small") == card.key(user, size="small")
        assert card.key(user=user, size="small") == card.key(user, "small")
        assert card.key(user, "small") != card.key(user, "full")
        assert card(user, "small") == card(user, size="small") == "small:ada"
        assert card(user) == "full:ada"
        assert len(cache) == 2
        # Another function, or another namespace, never shares an entry.
        assert card_v2.key(user, "small") != card.key(user, "small")
        assert card_v2.__wrapped__(user, "small") == "small:ada"  # uncached


def test_a_method_keys_on_its_arguments_not_on_self(
    users: sessionmaker[Session], keys: CacheKeyGenerator
) -> None:
    cache: dict[str, str] = {}

    class Cards:
        @cached(cache, key_generator=keys)
        def card(self, user: User) -> str:
            return f"<p>{user.name}</p>"

    with users() as session:
        user = session.get_one(User, 1)
        assert Cards().card(user) == Cards().card(user) == "<p>ada</p>"
        assert len(cache) == 1


def test_a_redis_cache_stores_pickles_that_expire_after_the_ttl(
    keys: CacheKeyGenerator, redis_client: RedisClient
) -> None:
    whole, fraction = keys("alkey:users#1", "whole"), keys("alkey:users#1", "fraction")
    get_or_create(redis_client, whole, lambda: {"a": 1}, ttl=timedelta(minutes=1))
    get_or_create(redis_client, fraction, lambda: {"b": 2}, ttl=1.5)
    assert 0 < redis_client.ttl(whole) <= 60
    assert 1000 < redis_client.pttl(fraction) <= 1500
    assert get_or_create(redis_client, whole, lambda: {"a": 2}) == {"a": 1}


def test_sync_and_asyncio_code_share_entries_in_redis(
    keys: CacheKeyGenerator,
    async_keys: AsyncCacheKeyGenerator,
    redis_client: RedisClient,
    async_redis_client: AsyncRedisClient,
    loop: asyncio.AbstractEventLoop,
) -> None:
    key = keys("alkey:users#1", "shared")
    assert get_or_create(redis_client, key, lambda: ["sync"]) == ["sync"]

    async def read() -> Any:
        assert await async_keys("alkey:users#1", "shared") == key  # the same key
        return await aget_or_create(async_redis_client, key, Calls(lambda: ["async"]).acall)

    assert loop.run_until_complete(read()) == ["sync"]


# -- concurrent misses -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dict", "redis", "dogpile"])
def test_concurrent_misses_of_one_key_compute_once(
    kind: str, keys: CacheKeyGenerator, redis_client: RedisClient
) -> None:
    cache: object = {"dict": {}, "redis": redis_client}.get(kind) or make_region().configure(
        "dogpile.cache.memory"
    )
    key = keys("alkey:users#1", "slow")
    render = Calls(lambda: "rendered", delay=0.2)
    start = threading.Barrier(8)
    results: list[str] = []

    def reader() -> None:
        start.wait()
        results.append(get_or_create(cache, key, render))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["rendered"] * 8
    assert render.count == 1
    assert not alkey.readthrough._flights  # nothing left in flight


def test_concurrent_misses_of_one_key_compute_once_in_tasks(
    async_keys: AsyncCacheKeyGenerator, async_cache: object, loop: asyncio.AbstractEventLoop
) -> None:
    render = Calls(lambda: "rendered", delay=0.2)

    async def scenario() -> list[str]:
        key = await async_keys("alkey:users#1", "slow")
        results: list[str] = await asyncio.gather(
            *[aget_or_create(async_cache, key, render.acall) for _ in range(8)]
        )
        return results

    assert loop.run_until_complete(scenario()) == ["rendered"] * 8
    assert render.count == 1
    assert not alkey.readthrough_asyncio._flights


def test_misses_of_different_keys_compute_concurrently(keys: CacheKeyGenerator) -> None:
    """The creators of four keys run at the same time: each waits at a barrier that only
    opens once all four are inside (one after another, the first would time out)."""
    cache: dict[str, str] = {}
    inside = threading.Barrier(4, timeout=10)

    def render() -> str:
        inside.wait()
        return "rendered"

    threads = [
        threading.Thread(target=get_or_create, args=(cache, keys("alkey:users#1", n), render))
        for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not inside.broken, "all four creators were running at once"
    assert list(cache.values()) == ["rendered"] * 4


def test_the_table_of_computations_in_flight_holds_only_those_running(
    keys: CacheKeyGenerator,
) -> None:
    cache: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def slow() -> int:
        inside.set()
        release.wait(5)
        return 1

    thread = threading.Thread(target=get_or_create, args=(cache, keys("slow"), slow))
    thread.start()
    inside.wait(5)
    assert len(alkey.readthrough._flights) == 1
    release.set()
    thread.join()
    for n in range(100):
        get_or_create(cache, keys(n), lambda: 1)
    assert not alkey.readthrough._flights
    assert len(cache) == 101


# -- failures ----------------------------------------------------------------------------------


class RenderError(Exception):
    pass


def test_a_failing_creator_caches_nothing_and_its_waiters_get_its_error(
    keys: CacheKeyGenerator,
) -> None:
    cache: dict[str, str] = {}
    key = keys("alkey:users#1", "failing")
    failing = Calls(lambda: (_ for _ in ()).throw(RenderError("database down")), delay=0.2)
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def reader() -> None:
        start.wait()
        try:
            get_or_create(cache, key, failing)
        except RenderError as error:
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failing.count == 1  # called once for the burst, not once per waiter
    assert [str(error) for error in errors] == ["database down"] * 4
    assert cache == {}
    assert get_or_create(cache, key, lambda: "recovered") == "recovered"  # computes anew
    assert cache == {key: "recovered"}


def test_a_failing_coroutine_caches_nothing_and_its_waiting_tasks_get_its_error(
    async_keys: AsyncCacheKeyGenerator, loop: asyncio.AbstractEventLoop
) -> None:
    cache: dict[str, str] = {}

    async def fail() -> str:
        await asyncio.sleep(0.1)
        raise RenderError("database down")

    async def scenario() -> None:
        key = await async_keys("alkey:users#1", "failing")
        outcomes = await asyncio.gather(
            *[aget_or_create(cache, key, fail) for _ in range(4)], return_exceptions=True
        )
        assert all(isinstance(outcome, RenderError) for outcome in outcomes)
        assert cache == {}
        assert await aget_or_create(cache, key, Calls(lambda: "recovered").acall) == "recovered"

    loop.run_until_complete(scenario())
    assert not alkey.readthrough_asyncio._flights


def test_a_cancelled_computation_makes_a_waiting_task_compute_instead(
    async_keys: AsyncCacheKeyGenerator, loop: asyncio.AbstractEventLoop
) -> None:
    cache: dict[str, str] = {}
    render = Calls(lambda: "rendered", delay=0.2)

    async def scenario() -> None:
        key = await async_keys("alkey:users#1", "cancelled")
        first = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)  # the first task computes
        second = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)  # the second waits for it
        first.cancel()
        assert await second == "rendered"
        assert first.cancelled()
        assert render.count == 2  # the second computed once the first was cancelled

    loop.run_until_complete(scenario())


def test_a_cancelled_waiting_task_leaves_the_computation_running(
    async_keys: AsyncCacheKeyGenerator, loop: asyncio.AbstractEventLoop
) -> None:
    cache: dict[str, str] = {}
    render = Calls(lambda: "rendered", delay=0.2)

    async def scenario() -> None:
        key = await async_keys("alkey:users#1", "waiter")
        first = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)
        second.cancel()
        assert await first == "rendered"
        assert second.cancelled()
        assert render.count == 1
        assert cache == {key: "rendered"}

    loop.run_until_complete(scenario())


def test_a_waiting_task_cancelled_with_the_computing_one_stays_cancelled(
    async_keys: AsyncCacheKeyGenerator, loop: asyncio.AbstractEventLoop
) -> None:
    """A scope that cancels both (a failing task group, a timeout, shutdown): the waiter
    must not take the computing task's cancellation for a cue to compute itself."""
    cache: dict[str, str] = {}
    render = Calls(lambda: "rendered", delay=0.2)

    async def scenario() -> None:
        key = await async_keys("alkey:users#1", "both cancelled")
        first = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(aget_or_create(cache, key, render.acall))
        await asyncio.sleep(0.05)
        first.cancel()
        second.cancel()
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
        assert render.count == 1, "nobody computed again"
        assert cache == {}

    loop.run_until_complete(scenario())
    assert not alkey.readthrough_asyncio._flights


def test_a_dogpile_region_computes_again_for_the_waiters_of_a_failed_computation(
    keys: CacheKeyGenerator,
) -> None:
    region = make_region().configure("dogpile.cache.memory")
    key = keys("alkey:users#1", "dogpile")
    with pytest.raises(RenderError):
        get_or_create(region, key, lambda: (_ for _ in ()).throw(RenderError("down")))
    assert alkey.readthrough.adapt_cache(region).get(key) is MISSING  # nothing cached
    assert get_or_create(region, key, lambda: "recovered", ttl=60) == "recovered"
    assert region.get(key) == "recovered"


# -- refusals ----------------------------------------------------------------------------------


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque cache>"


class GetAndSet(Opaque):
    def get(self, key: str) -> Any:
        return None

    def set(self, key: str, value: Any) -> None:
        pass


def test_a_cache_without_get_and_set_is_refused_with_a_message_naming_it() -> None:
    with pytest.raises(TypeError, match=r"<Opaque cache> \(a tests\.test_readthrough\.Opaque\)"):
        get_or_create(Opaque(), "key", lambda: 1)
    with pytest.raises(TypeError, match=r"it has no get\(\) and no set\(\) method"):
        cached(Opaque())
    with pytest.raises(TypeError, match=r"<Opaque cache>.*it has no get\(\) and no set\(\)"):
        acached(Opaque())


def test_a_cache_whose_miss_cannot_be_told_from_none_is_refused_with_the_way_out() -> None:
    with pytest.raises(
        TypeError, match=r"cannot tell how its get\(\) reports a miss.*CacheBackend"
    ):
        adapt_cache(GetAndSet())


def test_a_cache_of_the_wrong_flavour_is_refused_with_the_function_to_use(
    redis_client: RedisClient, async_redis_client: AsyncRedisClient
) -> None:
    with pytest.raises(TypeError, match=r"is an asyncio cache.*aget_or_create"):
        get_or_create(async_redis_client, "key", lambda: 1)
    with pytest.raises(TypeError, match=r"is a synchronous cache.*block the event loop"):
        acached(redis_client)
    with pytest.raises(TypeError, match=r"is a synchronous cache"):
        adapt_async_cache(make_region().configure("dogpile.cache.memory"))


def test_a_mapping_refuses_a_ttl_when_asked_for_one() -> None:
    with pytest.raises(TypeError, match=r"a mapping, which has no expiry per entry"):
        cached({}, ttl=60)
    with pytest.raises(TypeError, match=r"a mapping, which has no expiry per entry"):
        get_or_create({}, "key", lambda: 1, ttl=60)
    with pytest.raises(ValueError, match=r"ttl must be a positive number of seconds"):
        get_or_create(DictBackend(), "key", lambda: 1, ttl=0)


def test_a_client_that_decodes_its_replies_is_refused(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(TypeError, match=r"decode_responses=True"):
            adapt_cache(client)
    finally:
        client.close()


def test_each_decorator_refuses_the_other_flavour_of_function() -> None:
    async def coroutine_function() -> int:
        return 1

    def function() -> int:
        return 1

    with pytest.raises(TypeError, match=r"coroutine function.*acached"):
        cached({}, key_generator=lambda *args: "key")(coroutine_function)
    with pytest.raises(TypeError, match=r"not a coroutine function.*readthrough.cached"):
        acached({})(function)  # type: ignore[arg-type]


def render_card(user: User, size: str) -> str:
    return f"{user.name}:{size}"


def test_partials_of_one_function_fixing_other_arguments_key_apart() -> None:
    big, small = (
        FunctionKey(partial(render_card, size="big")),
        FunctionKey(partial(render_card, size="small")),
    )
    user = User(id=1, name="Ada")
    assert big.name == small.name == f"{__name__}:render_card"
    assert big.arguments(user) != small.arguments(user)
    assert big.arguments(user) == FunctionKey(partial(render_card, size="big")).arguments(user)


def test_a_lambda_without_a_namespace_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match="namespace"):
        cached({})(lambda user: user.name)
    assert cached({}, namespace="names")(lambda user: user.name) is not None
