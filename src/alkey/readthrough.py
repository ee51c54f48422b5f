"""Read-through caching on alkey's keys: :func:`get_or_create` and the :func:`cached`
decorator, on the cache the application already has.

Every application that caches writes the same four steps -- get, and on a miss compute,
set, return -- and the order in which it loads rows and builds keys decides whether it
caches stale data (see "Reading safely" in the guides). This module writes them once:

* :func:`get_or_create` takes a key that the caller built *after* loading the instances
  its ``creator`` reads, so a value is never stored under a key newer than its data;
* :func:`cached` decorates a function that takes model instances, and builds the key from
  the function's qualified name, a namespace and all its arguments *before* the function
  runs -- the instances' loaded state is part of their key, so a value computed from data
  loaded before a concurrent commit lands under a key that no reader of the new data
  builds.

Both work on any cache alkey knows how to read and write (see :func:`adapt_cache`): a
``dict`` or any other mutable mapping, a redis-py client (values pickled), a
dogpile.cache ``CacheRegion`` (through its own ``get_or_create`` and its lock), a
Flask-Caching ``Cache``, or an object of a class that implements :class:`CacheBackend`.
Concurrent misses of one key in one process compute once (a per-key lock, whose table
holds only the computations in flight). The asyncio twins live in
:mod:`alkey.readthrough_asyncio`, so that this module never imports SQLAlchemy's asyncio
support.
"""

from __future__ import annotations

import enum
import functools
import inspect
import math
import pickle
import threading
from collections.abc import Callable, MutableMapping
from concurrent.futures import CancelledError, Future
from datetime import timedelta
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar, cast, overload

from alkey.keys import CacheKeyGenerator

__all__ = [
    "MISSING",
    "CacheBackend",
    "CachedFunction",
    "FunctionKey",
    "Missing",
    "adapt_cache",
    "cached",
    "get_or_create",
]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)
_S = TypeVar("_S")
_P = ParamSpec("_P")
_P2 = ParamSpec("_P2")

#: The pickle protocol of values stored in Redis: fixed (not ``HIGHEST_PROTOCOL``), so
#: that processes on different Python versions can read each other's values.
_PICKLE_PROTOCOL: Final = 5


class Missing(enum.Enum):
    """The type of :data:`MISSING`: a single value, so that type checkers narrow
    ``value is MISSING`` as they do ``value is None``."""

    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


#: What :meth:`CacheBackend.get` returns on a miss. A sentinel rather than ``None``, so
#: that ``None`` can be cached like any other value: a function that found nothing is
#: not called again on every request.
MISSING: Final = Missing.MISSING


class CacheBackend(Protocol):
    """How alkey reads and writes a cache: the interface :func:`adapt_cache` gives every
    cache it knows.

    To use a cache that :func:`adapt_cache` does not know, write a class that *subclasses*
    this protocol explicitly (``class MyCache(CacheBackend): ...``) and pass an instance.
    Explicitly, because a ``get`` and a ``set`` alone do not say how a cache reports a
    miss (many return ``None``, which is also a value worth caching) or how it takes an
    expiry -- guessing either would serve a wrong value or keep a stale one forever.
    """

    def get(self, key: str) -> Any:
        """The value stored under ``key``, or :data:`MISSING` if there is none."""

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds (never, or the
        cache's default, if ``None``)."""


class CachedFunction(Protocol[_P, _T_co]):
    """What :func:`cached` returns: the function, cached, and the key of a call.

    :meth:`key` builds the key the function would read and write for these arguments --
    to look at the cache, or to delete an entry -- at the cost of one key generation.
    """

    @property
    def __wrapped__(self) -> Callable[_P, _T_co]:
        """The function undecorated: calls it without the cache."""

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _T_co:
        """The cached value for these arguments, computed on a miss."""

    def key(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of a call with these arguments."""

    # A decorated method is a function, bound to its instance as any other: without
    # __get__, type checkers would not bind ``self``.
    @overload
    def __get__(self, instance: None, owner: type | None = None, /) -> CachedFunction[_P, _T_co]:
        """The cached function itself, looked up on a class."""

    @overload
    def __get__(
        self: CachedFunction[Concatenate[_S, _P2], _T_co],
        instance: _S,
        owner: type | None = None,
        /,
    ) -> Callable[_P2, _T_co]:
        """The cached method, bound to ``instance``."""

    def __get__(self, instance: Any, owner: type | None = None, /) -> Any:
        """A method bound to ``instance``, or the function itself on a class."""


class FunctionKey:
    """The key arguments of calls of one function: its qualified name, a namespace, and
    the call's arguments by parameter name.

    Binding the arguments to the function's parameters makes ``card(note, "small")`` and
    ``card(note, size="small")`` one key; a parameter the call leaves to its default is
    not part of the key (its default may be an object with no stable text, such as a
    sentinel), so a call that spells the default out caches apart (correctly, just once
    more). A first parameter named ``self`` or ``cls`` is left out, as dogpile.cache
    does: an instance of the class that defines a method has no stable text; key on what
    it holds by passing that as an argument.

    A :func:`functools.partial` keys as its function with the arguments it fixes; a lambda
    needs a ``namespace`` (every lambda of a module has one name, so a :class:`TypeError`
    says so rather than share keys). Closures that one factory makes share its name: give
    each its own ``namespace`` when what they capture differs.

    :func:`cached` and the adapters in :mod:`alkey.adapters` build their keys with it, so
    the same call makes the same key whichever front end caches it.
    """

    __slots__ = ("_fixed", "_self", "_signature", "name", "namespace")

    def __init__(self, fn: Callable[..., Any], namespace: str | None = None) -> None:
        # A partial is its function with some arguments fixed: those are part of the key,
        # or partial(render, size="big") would serve what partial(render, size="small")
        # stored.
        fixed: list[object] = []
        inner: Any = fn
        while isinstance(inner, functools.partial):
            fixed.append((inner.args, inner.keywords))
            inner = inner.func
        self._fixed = tuple(fixed)
        # Another callable object without a name of its own is named by its class.
        named = inner if hasattr(inner, "__qualname__") else type(inner)
        if named.__name__ == "<lambda>" and namespace is None:
            raise TypeError(
                f"cannot key {fn!r}: every lambda of {named.__module__} has the name "
                "<lambda>, so their keys would be shared; define it with def, or give "
                "a namespace of its own (namespace=...)"
            )
        #: ``module:qualified name`` of the function, the same in every process.
        self.name = f"{named.__module__}:{named.__qualname__}"
        #: The namespace given: part of every key, so two caches of one function differ.
        self.namespace = namespace
        try:
            self._signature: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature
            self._signature = None
        parameters = list(self._signature.parameters) if self._signature is not None else []
        self._self = parameters[0] if parameters and parameters[0] in ("self", "cls") else None

    def arguments(self, *args: Any, **kwargs: Any) -> tuple[object, ...]:
        """The arguments to give a key generator for a call with ``args`` and ``kwargs``.

        Raises :class:`TypeError` if the function could not be called with them, as the
        call itself would.
        """
        if self._signature is None:
            return (self.name, self.namespace, *self._fixed, args, kwargs)
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        if self._self is not None:
            arguments.pop(self._self, None)
        return (self.name, self.namespace, *self._fixed, arguments)


def _seconds(ttl: float | timedelta | None) -> float | None:
    """``ttl`` in seconds, refusing an expiry that is not in the future."""
    if ttl is None:
        return None
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else float(ttl)
    if not seconds > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return seconds


def _describe(cache: object) -> str:
    kind = type(cache)
    return f"{cache!r} (a {kind.__module__}.{kind.__qualname__})"


def _has(cache: object, *names: str) -> bool:
    return all(callable(getattr(cache, name, None)) for name in names)


def _is_async_redis(cache: object) -> bool:
    return _has(cache, "execute_command", "get", "set") and inspect.iscoroutinefunction(
        getattr(type(cache), "execute_command", None)
    )


def _is_async_cache(cache: object) -> bool:
    """Whether ``cache`` reads with ``await``: redis.asyncio, cashews, aiocache..."""
    get = getattr(cache, "get", None)
    return _is_async_redis(cache) or (callable(get) and inspect.iscoroutinefunction(get))


def _is_dogpile_no_value(value: object) -> bool:
    """Whether ``value`` is dogpile.cache's ``NO_VALUE``, recognised without importing
    dogpile: the member of its ``NoValue`` enum."""
    kind = type(value)
    return kind.__name__ == "NoValue" and kind.__module__.startswith("dogpile.")


class _MappingCache(CacheBackend):
    """A ``dict``, ``cachetools`` cache or any other mutable mapping."""

    def __init__(self, mapping: MutableMapping[str, Any]) -> None:
        self.mapping = mapping

    def get(self, key: str) -> Any:
        try:
            return self.mapping[key]
        except KeyError:
            return MISSING

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        if ttl is not None:
            raise TypeError(_no_ttl_message(self.mapping))
        self.mapping[key] = value


def _no_ttl_message(mapping: object) -> str:
    return (
        f"{_describe(mapping)} is a mapping, which has no expiry per entry: pass no ttl, "
        "and give the mapping an expiry or eviction policy of its own "
        "(cachetools.TTLCache, LRUCache)"
    )


class _RedisCache(CacheBackend):
    """A redis-py (or valkey-py) client: values pickled, ``ttl`` as ``EX`` or ``PX``.

    Unpickling trusts what the Redis holds, as any pickling cache does: give the cache a
    Redis (or a database of it) that only your application writes.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, key: str) -> Any:
        data = self.client.get(key)
        return MISSING if data is None else pickle.loads(data)

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.client.set(key, pickle.dumps(value, _PICKLE_PROTOCOL), **_redis_expiry(ttl))


def _redis_expiry(ttl: float | None) -> dict[str, int]:
    """``ttl`` as redis-py's ``set()`` takes it: ``ex`` in whole seconds, or ``px`` in
    milliseconds (rounded up) when it has a fraction, or nothing (no expiry)."""
    if ttl is None:
        return {}
    if ttl == int(ttl):
        return {"ex": int(ttl)}
    return {"px": math.ceil(ttl * 1000)}


def _check_redis_client(client: Any) -> None:
    """Refuse a redis-py client that decodes its replies: pickled values are bytes."""
    get_encoder = getattr(client, "get_encoder", None)
    if callable(get_encoder) and getattr(get_encoder(), "decode_responses", False):
        raise TypeError(
            f"{_describe(client)} decodes its replies (decode_responses=True), and the "
            "cached values are pickled bytes: give alkey a client without it"
        )


class _RegionCache(CacheBackend):
    """A dogpile.cache ``CacheRegion``: :func:`get_or_create` uses the region's own
    ``get_or_create``, and with it dogpile's lock and its expiration."""

    def __init__(self, region: Any) -> None:
        self.region = region

    def get(self, key: str) -> Any:
        value = self.region.get(key)
        return MISSING if _is_dogpile_no_value(value) else value

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        # dogpile stores a value with its creation time and applies an expiration when it
        # reads it: get_or_create() passes ttl as its expiration_time.
        self.region.set(key, value)

    def get_or_create(self, key: str, creator: Callable[[], _T], ttl: float | None) -> _T:
        return cast(_T, self.region.get_or_create(key, creator, expiration_time=ttl))


class _FlaskCache(CacheBackend):
    """A Flask-Caching ``Cache`` (used in an application context, as always): a ``None``
    read is told from a miss with ``has()``, and ``ttl`` is its ``timeout``, rounded up
    to whole seconds."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def get(self, key: str) -> Any:
        value = self.cache.get(key)
        if value is None and not self.cache.has(key):
            return MISSING
        return value

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        if ttl is None:
            self.cache.set(key, value)
        else:
            self.cache.set(key, value, timeout=math.ceil(ttl))


def adapt_cache(cache: object) -> CacheBackend:
    """``cache`` as a :class:`CacheBackend`: how :func:`get_or_create` and :func:`cached`
    read and write it.

    Recognised by what they have, without importing their libraries:

    * an object of a class that subclasses :class:`CacheBackend`: used as it is;
    * a dogpile.cache ``CacheRegion`` (``get_or_create`` and ``cache_on_arguments``);
    * a Flask-Caching ``Cache`` (``memoize``, ``cached``, ``has``, ``get``, ``set``);
    * a redis-py or valkey-py client (``execute_command``, ``get``, ``set``), whose
      values are pickled, and which must not decode its replies;
    * a ``dict`` or any other ``MutableMapping`` (``cachetools`` caches), which takes no
      ``ttl``: it expires entries by its own policy, or never.

    Anything else raises :class:`TypeError` naming the object and what it lacks -- an
    asyncio cache among them, which :func:`alkey.readthrough_asyncio.adapt_async_cache`
    takes.
    """
    if CacheBackend in type(cache).__mro__:
        return cast(CacheBackend, cache)
    if _is_async_cache(cache):
        raise TypeError(
            f"{_describe(cache)} is an asyncio cache (its get() must be awaited): use "
            "alkey.readthrough_asyncio.aget_or_create() or acached()"
        )
    if _has(cache, "get_or_create", "cache_on_arguments"):
        return _RegionCache(cache)
    if _has(cache, "memoize", "cached", "has", "get", "set"):
        return _FlaskCache(cache)
    if _has(cache, "execute_command", "get", "set"):
        _check_redis_client(cache)
        return _RedisCache(cache)
    if isinstance(cache, MutableMapping):
        return _MappingCache(cache)
    lacking = [f"{name}()" for name in ("get", "set") if not _has(cache, name)]
    if lacking:
        what = f"it has no {' and no '.join(lacking)} method"
    else:
        what = (
            "it has get() and set(), but alkey cannot tell how its get() reports a miss "
            "(None may be a cached value) or how its set() takes an expiry"
        )
    raise TypeError(
        f"{_describe(cache)} cannot be used as a cache: {what}. Pass a dict or other "
        "MutableMapping, a redis-py client, a dogpile.cache CacheRegion or a Flask-Caching "
        "Cache, or an object of a class that subclasses alkey.readthrough.CacheBackend "
        "(get() returning alkey.readthrough.MISSING on a miss, set(key, value, ttl))"
    )


def _check_ttl(backend: CacheBackend, ttl: float | None) -> None:
    """Refuse a ``ttl`` for a cache that cannot expire one entry (a mapping): when the
    caller asks for it rather than after the first computation."""
    if ttl is not None and isinstance(backend, _MappingCache):
        raise TypeError(_no_ttl_message(backend.mapping))


# -- single flight: concurrent misses of one key compute once ---------------------------------

#: The computations in flight, by cache and key: an entry lives while its computation
#: runs and is removed as it ends, so the table never grows beyond the misses in flight.
_flights: dict[tuple[int, str], Future[Any]] = {}
_flights_lock = threading.Lock()


def _single_flight(
    backend: CacheBackend, cache_id: int, key: str, creator: Callable[[], _T], ttl: float | None
) -> _T:
    """The value under ``key``, computed by one caller at a time in this process.

    The first caller to miss computes and stores; callers that miss while it computes wait
    for its outcome -- its value, or its exception (the same outcome they would have
    computed themselves a moment later; a failing creator, such as a database that is
    down, is called once per burst rather than once per waiter). If the computing thread
    is interrupted instead (``KeyboardInterrupt``, ``SystemExit``), nothing failed: the
    waiters ask again, and one of them computes.
    """
    flight_key = (cache_id, key)
    while True:
        with _flights_lock:
            flight = _flights.get(flight_key)
            leader = flight is None
            if flight is None:
                flight = _flights[flight_key] = Future()
        if not leader:
            try:
                return cast(_T, flight.result())
            except CancelledError:
                continue  # the computing thread was interrupted: ask again
        outcome: BaseException | None = None
        try:
            # A computation that ended between our miss and our turn stored its value.
            value = backend.get(key)
            if value is MISSING:
                value = creator()
                backend.set(key, value, ttl)
        except BaseException as error:
            outcome = error
            raise
        finally:
            with _flights_lock:
                del _flights[flight_key]
            if outcome is None:
                flight.set_result(value)
            elif isinstance(outcome, Exception):
                flight.set_exception(outcome)
            else:
                flight.cancel()
        return cast(_T, value)


def _get_or_create(
    backend: CacheBackend, cache_id: int, key: str, creator: Callable[[], _T], ttl: float | None
) -> _T:
    if isinstance(backend, _RegionCache):
        return backend.get_or_create(key, creator, ttl)
    value = backend.get(key)
    if value is not MISSING:
        return cast(_T, value)
    return _single_flight(backend, cache_id, key, creator, ttl)


def get_or_create(
    cache: object,
    key: str,
    creator: Callable[[], _T],
    *,
    ttl: float | timedelta | None = None,
) -> _T:
    """The value cached under ``key``; on a miss, ``creator()``, stored under ``key``.

    Build ``key`` *after* loading the instances that ``creator`` reads, and key on those
    instances (``key_generator(note, "card")``): their loaded state is part of their key,
    so a value computed from data that a concurrent commit made old is stored under a key
    that no reader of the new data builds. (A key on identifiers or classes, which carry
    no loaded state, must be built *before* loading: see "Reading safely".)

    ``cache`` is anything :func:`adapt_cache` takes. ``ttl`` (seconds, or a
    :class:`~datetime.timedelta`) expires the entry; a mapping takes none. ``None`` is
    cached like any other value.

    Concurrent misses of ``key`` in this process call ``creator`` once: the others wait
    for it and return its value. If ``creator`` raises, nothing is cached, the exception
    propagates to the caller and to the callers waiting for it, and the next call
    computes again. With a dogpile.cache region, the region's own ``get_or_create`` and
    lock do this instead (its waiters compute again after a failure), and with a
    distributed lock (``distributed_lock=True`` on its Redis backend) across processes.
    """
    backend = adapt_cache(cache)
    seconds = _seconds(ttl)
    _check_ttl(backend, seconds)
    return _get_or_create(backend, id(cache), key, creator, seconds)


def cached(
    cache: object,
    *,
    key_generator: Callable[..., str] | None = None,
    namespace: str | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[Callable[_P, _T]], CachedFunction[_P, _T]]:
    """Cache what a function returns under alkey's key of its arguments.

    For functions that take model instances: ``@cached(cache)`` on ``def card(note)``
    caches ``card(note)`` until a transaction that wrote the note commits. The key is
    built before the function runs, from the function's module and qualified name,
    ``namespace`` and every argument, keyword arguments by name (see
    :class:`FunctionKey`): the instances' loaded state is part of it, so a value computed
    from instances loaded before a concurrent commit is never served to a reader of the
    new data. Every argument must be something a key can be made of -- instances,
    identifiers, plain values -- so pass the instances a value depends on rather than a
    session to load them with.

    ``key_generator`` makes the keys (a :class:`~alkey.keys.CacheKeyGenerator`, by default
    one on the default Redis client); ``cache`` and ``ttl`` are as for
    :func:`get_or_create`, and so is the protection against concurrent misses. The cache
    is checked when decorating, so a cache alkey cannot use fails at import time rather
    than at the first call. A coroutine function is refused: decorate it with
    :func:`alkey.readthrough_asyncio.acached`.
    """
    backend = adapt_cache(cache)
    seconds = _seconds(ttl)
    _check_ttl(backend, seconds)
    generator = key_generator if key_generator is not None else CacheKeyGenerator()
    cache_id = id(cache)

    def decorate(fn: Callable[_P, _T]) -> CachedFunction[_P, _T]:
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{fn.__qualname__} is a coroutine function: cached() would cache its "
                "coroutine object; decorate it with alkey.readthrough_asyncio.acached()"
            )
        function_key = FunctionKey(fn, namespace)

        def key(*args: _P.args, **kwargs: _P.kwargs) -> str:
            return generator(*function_key.arguments(*args, **kwargs))

        @functools.wraps(fn)
        def cached_fn(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return _get_or_create(
                backend, cache_id, key(*args, **kwargs), lambda: fn(*args, **kwargs), seconds
            )

        cached_fn.key = key  # type: ignore[attr-defined]
        return cast(CachedFunction[_P, _T], cached_fn)

    return decorate
