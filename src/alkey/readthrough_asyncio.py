"""Read-through caching for asyncio code: :func:`aget_or_create` and :func:`acached`.

The twins of :func:`alkey.readthrough.get_or_create` and :func:`alkey.readthrough.cached`,
with an awaitable creator, keys from an :class:`~alkey.asyncio.AsyncCacheKeyGenerator`,
and a cache read with ``await``: a ``redis.asyncio`` client (values pickled), a cashews
``Cache``, an aiocache cache, or an object of a class that implements
:class:`AsyncCacheBackend` (see :func:`adapt_async_cache`). Caching decorators of those
libraries build their keys synchronously, so they cannot await an alkey key; these
functions await it first.

Concurrent misses of one key on one event loop compute once: the first task computes,
the others await its outcome (a per-key future, held only while it computes). This module
imports :mod:`alkey.asyncio`, and with it SQLAlchemy's asyncio support, which is why it is
not part of :mod:`alkey.readthrough`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import pickle
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from datetime import timedelta
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, overload

from alkey.asyncio import AsyncCacheKeyGenerator
from alkey.readthrough import (
    _PICKLE_PROTOCOL,
    MISSING,
    CacheBackend,
    FunctionKey,
    _check_redis_client,
    _check_ttl,
    _describe,
    _has,
    _is_async_redis,
    _redis_expiry,
    _seconds,
    adapt_cache,
)

__all__ = [
    "AsyncCacheBackend",
    "AsyncCachedFunction",
    "acached",
    "adapt_async_cache",
    "aget_or_create",
]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)
_S = TypeVar("_S")
_P = ParamSpec("_P")
_P2 = ParamSpec("_P2")


class AsyncCacheBackend(Protocol):
    """How alkey reads and writes an asyncio cache: the interface
    :func:`adapt_async_cache` gives every cache it knows.

    To use another, write a class that *subclasses* this protocol explicitly and pass an
    instance -- explicitly for the reason given at :class:`alkey.readthrough.CacheBackend`:
    a ``get`` and a ``set`` do not say how a cache reports a miss or takes an expiry.
    """

    async def get(self, key: str) -> Any:
        """The value stored under ``key``, or :data:`alkey.readthrough.MISSING`."""

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (never, or the
        cache's default, if ``None``)."""


class AsyncCachedFunction(Protocol[_P, _T_co]):
    """What :func:`acached` returns: the coroutine function, cached, and the key of a
    call (``await fn.key(note)``), to look at the cache or delete an entry."""

    @property
    def __wrapped__(self) -> Callable[_P, Awaitable[_T_co]]:
        """The function undecorated: calls it without the cache."""

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _T_co]:
        """The cached value for these arguments, computed on a miss."""

    async def key(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of a call with these arguments."""

    @overload
    def __get__(
        self, instance: None, owner: type | None = None, /
    ) -> AsyncCachedFunction[_P, _T_co]:
        """The cached function itself, looked up on a class."""

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[_S, _P2], _T_co],
        instance: _S,
        owner: type | None = None,
        /,
    ) -> Callable[_P2, Coroutine[Any, Any, _T_co]]:
        """The cached method, bound to ``instance``."""

    def __get__(self, instance: Any, owner: type | None = None, /) -> Any:
        """A method bound to ``instance``, or the function itself on a class."""


class _Synchronous(AsyncCacheBackend):
    """A cache whose calls do not block -- a mapping, or a :class:`CacheBackend` of the
    application's -- called directly from the event loop."""

    def __init__(self, backend: CacheBackend) -> None:
        self.backend = backend

    async def get(self, key: str) -> Any:
        return self.backend.get(key)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.backend.set(key, value, ttl)


class _AsyncRedisCache(AsyncCacheBackend):
    """A ``redis.asyncio`` (or ``valkey.asyncio``) client: values pickled, as the sync
    client's are, so sync and asyncio code can share entries."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def get(self, key: str) -> Any:
        data = await self.client.get(key)
        return MISSING if data is None else pickle.loads(data)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        await self.client.set(key, pickle.dumps(value, _PICKLE_PROTOCOL), **_redis_expiry(ttl))


class _CashewsCache(AsyncCacheBackend):
    """A cashews ``Cache``: a miss is told by a ``default`` of our own, ``ttl`` is its
    ``expire``."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    async def get(self, key: str) -> Any:
        return await self.cache.get(key, default=MISSING)

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        await self.cache.set(key, value, expire=ttl)


class _AiocacheCache(AsyncCacheBackend):
    """An aiocache cache (``SimpleMemoryCache``, ``RedisCache``, ...). Its ``get()``
    returns the default for a stored ``None`` too, so a miss is confirmed with
    ``exists()`` (one more call per miss, none per hit)."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    async def get(self, key: str) -> Any:
        value = await self.cache.get(key, default=MISSING)
        if value is MISSING and await self.cache.exists(key):
            return None
        return value

    async def set(self, key: str, value: Any, ttl: float | None) -> None:
        if ttl is None:
            await self.cache.set(key, value)  # the cache's own default ttl
        else:
            await self.cache.set(key, value, ttl=ttl)


def _is_cashews(cache: object) -> bool:
    return _has(cache, "setup", "set_lock", "get", "set")


def _is_aiocache(cache: object) -> bool:
    return _has(cache, "multi_get", "multi_set", "exists", "add", "get", "set")


def adapt_async_cache(cache: object) -> AsyncCacheBackend:
    """``cache`` as an :class:`AsyncCacheBackend`: how :func:`aget_or_create` and
    :func:`acached` read and write it.

    Recognised by what they have, without importing their libraries:

    * an object of a class that subclasses :class:`AsyncCacheBackend`: used as it is;
    * a ``redis.asyncio`` or ``valkey.asyncio`` client, whose values are pickled;
    * a cashews ``Cache`` (``setup``, ``set_lock``, ``get``, ``set``);
    * an aiocache cache (``multi_get``, ``multi_set``, ``exists``, ``add``);
    * a ``dict`` or other ``MutableMapping``, or an object of a class that subclasses
      :class:`alkey.readthrough.CacheBackend`: called directly from the event loop, so
      it must not block.

    A synchronous cache that does I/O (a redis-py client, a dogpile.cache region, a
    Flask-Caching cache) would stall the event loop for each round trip, so it is refused
    with a :class:`TypeError` that says so; anything else with one naming the object and
    what it lacks.
    """
    kind = type(cache)
    if AsyncCacheBackend in kind.__mro__:
        return cast(AsyncCacheBackend, cache)
    if CacheBackend in kind.__mro__ or isinstance(cache, MutableMapping):
        return _Synchronous(adapt_cache(cache))
    if _is_async_redis(cache):
        _check_redis_client(cache)
        return _AsyncRedisCache(cache)
    get = getattr(cache, "get", None)
    if callable(get) and inspect.iscoroutinefunction(get):
        if _is_cashews(cache):
            return _CashewsCache(cache)
        if _is_aiocache(cache):
            return _AiocacheCache(cache)
        what = (
            "its get() is awaited, but alkey cannot tell how it reports a miss (None may "
            "be a cached value) or how its set() takes an expiry"
        )
    else:
        try:
            adapt_cache(cache)
        except TypeError:
            lacking = [f"{name}()" for name in ("get", "set") if not _has(cache, name)]
            what = (
                f"it has no {' and no '.join(lacking)} method"
                if lacking
                else "its get() and set() are not awaited, and alkey cannot tell how they "
                "report a miss or take an expiry"
            )
        else:
            raise TypeError(
                f"{_describe(cache)} is a synchronous cache, whose every call would block "
                "the event loop: use its asyncio client (redis.asyncio), or "
                "alkey.readthrough.get_or_create() from synchronous code"
            ) from None
    raise TypeError(
        f"{_describe(cache)} cannot be used as an asyncio cache: {what}. Pass a "
        "redis.asyncio client, a cashews Cache, an aiocache cache, a dict, or an object of "
        "a class that subclasses alkey.readthrough_asyncio.AsyncCacheBackend (async get() "
        "returning alkey.readthrough.MISSING on a miss, async set(key, value, ttl))"
    )


def _check_async_ttl(backend: AsyncCacheBackend, ttl: float | None) -> None:
    if isinstance(backend, _Synchronous):
        _check_ttl(backend.backend, ttl)


# -- single flight: concurrent misses of one key compute once --------------------------------

#: The computations in flight, by event loop, cache and key: an entry lives while its
#: computation runs and is removed as it ends.
_flights: dict[tuple[int, int, str], asyncio.Future[Any]] = {}


async def _single_flight(
    backend: AsyncCacheBackend,
    cache_id: int,
    key: str,
    creator: Callable[[], Awaitable[_T]],
    ttl: float | None,
) -> _T:
    """The value under ``key``, computed by one task at a time on this event loop.

    Tasks that miss while another computes await its outcome: its value or its exception
    (as :func:`alkey.readthrough.get_or_create`'s waiting threads do). If the computing
    task is cancelled, nothing failed: the waiting tasks ask again and one computes. A
    waiting task that is cancelled stops waiting and leaves the computation running.
    """
    loop = asyncio.get_running_loop()
    flight_key = (id(loop), cache_id, key)
    while True:
        flight = _flights.get(flight_key)
        if flight is not None:
            # asyncio.wait raises CancelledError only when *this* task is cancelled (it
            # never cancels the flight), so the two cancellations cannot be confused.
            await asyncio.wait((flight,))
            if flight.cancelled():
                continue  # the computing task was cancelled: ask again
            return cast(_T, flight.result())
        flight = _flights[flight_key] = loop.create_future()
        try:
            # A computation that ended between our miss and our turn stored its value.
            value = await backend.get(key)
            if value is MISSING:
                value = await creator()
                await backend.set(key, value, ttl)
        except Exception as error:
            del _flights[flight_key]
            flight.set_exception(error)
            flight.exception()  # retrieved: it is raised here, whether or not others wait
            raise
        except BaseException:
            del _flights[flight_key]
            flight.cancel()
            raise
        del _flights[flight_key]
        flight.set_result(value)
        return cast(_T, value)


async def _aget_or_create(
    backend: AsyncCacheBackend,
    cache_id: int,
    key: str,
    creator: Callable[[], Awaitable[_T]],
    ttl: float | None,
) -> _T:
    value = await backend.get(key)
    if value is not MISSING:
        return cast(_T, value)
    return await _single_flight(backend, cache_id, key, creator, ttl)


async def aget_or_create(
    cache: object,
    key: str,
    creator: Callable[[], Awaitable[_T]],
    *,
    ttl: float | timedelta | None = None,
) -> _T:
    """The value cached under ``key``; on a miss, ``await creator()``, stored under
    ``key``.

    :func:`alkey.readthrough.get_or_create` for asyncio code, with the same rule: build
    ``key`` (``await key_generator(note, "card")``) after loading the instances that
    ``creator`` reads, and key on them. ``cache`` is anything :func:`adapt_async_cache`
    takes; ``ttl`` is seconds or a :class:`~datetime.timedelta`; ``None`` is cached like
    any other value.

    Concurrent misses of ``key`` on this event loop await one ``creator()``. If it
    raises, nothing is cached and the exception reaches the caller and the tasks waiting
    for it; the next call computes again.
    """
    backend = adapt_async_cache(cache)
    seconds = _seconds(ttl)
    _check_async_ttl(backend, seconds)
    return await _aget_or_create(backend, id(cache), key, creator, seconds)


def acached(
    cache: object,
    *,
    key_generator: Callable[..., Awaitable[str]] | None = None,
    namespace: str | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[Callable[_P, Awaitable[_T]]], AsyncCachedFunction[_P, _T]]:
    """Cache what a coroutine function returns under alkey's key of its arguments.

    :func:`alkey.readthrough.cached` for ``async def`` functions that take model
    instances: the key -- the function's module and qualified name, ``namespace`` and
    every argument, keyword arguments by name (:class:`alkey.readthrough.FunctionKey`) --
    is awaited before the function runs, so a value computed from instances loaded before
    a concurrent commit is never served to a reader of the new data.

    ``key_generator`` is an :class:`~alkey.asyncio.AsyncCacheKeyGenerator` (by default
    one on each event loop's default client, made at the first call); ``cache`` and
    ``ttl`` are as for :func:`aget_or_create`, and so is the protection against
    concurrent misses. A function that is not a coroutine function is refused: decorate
    it with :func:`alkey.readthrough.cached`.
    """
    backend = adapt_async_cache(cache)
    seconds = _seconds(ttl)
    _check_async_ttl(backend, seconds)
    cache_id = id(cache)
    generators: list[Callable[..., Awaitable[str]]] = (
        [key_generator] if key_generator is not None else []
    )

    def decorate(fn: Callable[_P, Awaitable[_T]]) -> AsyncCachedFunction[_P, _T]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} is not a coroutine function: "
                "decorate it with alkey.readthrough.cached()"
            )
        function_key = FunctionKey(fn, namespace)

        async def key(*args: _P.args, **kwargs: _P.kwargs) -> str:
            if not generators:  # the default, made on first use: no configuration at import
                generators.append(AsyncCacheKeyGenerator())
            return await generators[0](*function_key.arguments(*args, **kwargs))

        @functools.wraps(fn)
        async def cached_fn(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return await _aget_or_create(
                backend,
                cache_id,
                await key(*args, **kwargs),
                lambda: fn(*args, **kwargs),
                seconds,
            )

        cached_fn.key = key  # type: ignore[attr-defined]
        return cast(AsyncCachedFunction[_P, _T], cached_fn)

    return decorate
