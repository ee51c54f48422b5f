"""aiocache caches under alkey's keys: a ``cached`` decorator that awaits the key.

aiocache's ``@cached(key_builder=...)`` calls its key builder synchronously, so it
cannot await an :class:`~alkey.asyncio.AsyncCacheKeyGenerator`, and its default key is
built from the arguments' text, which does not change when a row is written. This
module's :func:`cached` awaits alkey's key of the function and its arguments before the
function runs, and reads and writes through an aiocache cache you made::

    from aiocache import SimpleMemoryCache  # or RedisCache, MemcachedCache
    from alkey.adapters.aiocache import cached

    cards = SimpleMemoryCache()

    @cached(cards, ttl=3600)
    async def card(note: Note) -> str: ...

Concurrent misses of one key on one event loop compute once. ``None`` is cached (a miss
is confirmed with ``exists()``). ``pip install 'alkey[aiocache]'``; this module imports
aiocache only for type checking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from alkey.readthrough import _describe
from alkey.readthrough_asyncio import AsyncCachedFunction, _is_aiocache, acached

if TYPE_CHECKING:
    from aiocache.base import BaseCache  # type: ignore[import-untyped]

__all__ = ["cached"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


def cached(
    cache: BaseCache,
    *,
    key_generator: Callable[..., Awaitable[str]] | None = None,
    namespace: str | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[Callable[_P, Awaitable[_T]]], AsyncCachedFunction[_P, _T]]:
    """Cache what a coroutine function returns in the aiocache ``cache``, under alkey's
    key of its arguments.

    :func:`alkey.readthrough_asyncio.acached` for an aiocache cache: ``key_generator``
    (an :class:`~alkey.asyncio.AsyncCacheKeyGenerator`, by default each event loop's),
    ``namespace`` and ``ttl`` (aiocache's ``ttl``; the cache's default if ``None``) mean
    the same. Raises :class:`TypeError` if ``cache`` is not an aiocache cache.
    """
    if not _is_aiocache(cache):
        raise TypeError(
            f"{_describe(cache)} is not an aiocache cache (SimpleMemoryCache, RedisCache, "
            "...): use alkey.readthrough_asyncio.acached() for other caches"
        )
    return acached(cache, key_generator=key_generator, namespace=namespace, ttl=ttl)
