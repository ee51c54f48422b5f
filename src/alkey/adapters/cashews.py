"""cashews caches under alkey's keys: a ``cached`` decorator that awaits the key.

cashews' decorators (``@cache(ttl=..., key="...")``) format their key templates from the
arguments synchronously, so they cannot await an
:class:`~alkey.asyncio.AsyncCacheKeyGenerator`, and a template of an instance's text
does not change when its row is written. This module's :func:`cached` awaits alkey's
key of the function and its arguments before the function runs, and reads and writes
through a cashews ``Cache`` you set up::

    from cashews import Cache
    from alkey.adapters.cashews import cached

    cache = Cache()
    cache.setup("redis://...")  # or "mem://"

    @cached(cache, ttl=3600)
    async def card(note: Note) -> str: ...

Concurrent misses of one key on one event loop compute once, and ``None`` is cached.
``pip install 'alkey[cashews]'``; this module imports cashews only for type checking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from alkey.readthrough import _describe
from alkey.readthrough_asyncio import AsyncCachedFunction, _is_cashews, acached

if TYPE_CHECKING:
    from cashews import Cache

__all__ = ["cached"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


def cached(
    cache: Cache,
    *,
    key_generator: Callable[..., Awaitable[str]] | None = None,
    namespace: str | None = None,
    ttl: float | timedelta | None = None,
) -> Callable[[Callable[_P, Awaitable[_T]]], AsyncCachedFunction[_P, _T]]:
    """Cache what a coroutine function returns in the cashews ``cache``, under alkey's
    key of its arguments.

    :func:`alkey.readthrough_asyncio.acached` for a cashews ``Cache``: ``key_generator``
    (an :class:`~alkey.asyncio.AsyncCacheKeyGenerator`, by default each event loop's),
    ``namespace`` and ``ttl`` (cashews' ``expire``; none if ``None``) mean the same.
    Raises :class:`TypeError` if ``cache`` is not a cashews ``Cache``.
    """
    if not _is_cashews(cache):
        raise TypeError(
            f"{_describe(cache)} is not a cashews Cache: use "
            "alkey.readthrough_asyncio.acached() for other caches"
        )
    return acached(cache, key_generator=key_generator, namespace=namespace, ttl=ttl)
