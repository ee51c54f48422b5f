"""Flask-Caching's ``@cache.cached()`` keyed by alkey, and a ``memoize`` for functions
that take model instances.

Flask-Caching's ``@cache.memoize()`` hashes ``repr()`` of the arguments: a model
instance's default ``repr()`` holds its memory address (every load misses and adds an
entry), and a ``__repr__`` that names the primary key serves values cached before a
write. Its ``@cache.cached()`` keys on the request path, which no write changes. Both
accept no key of alkey's directly, but ``cached()`` takes a ``make_cache_key`` callable,
which receives the decorated function's arguments:

* :func:`memoize` -- ``@memoize(cache)`` on a function that takes model instances: its
  key is alkey's key of the function and its arguments (as
  :class:`alkey.readthrough.FunctionKey` builds it), through Flask-Caching's own
  ``cached()`` -- so ``unless``, ``response_filter``, ``cache_none``, ``forced_update``,
  its signals and ``uncached`` work as they do there;
* :func:`make_cache_key` -- a ``make_cache_key`` for ``@cache.cached()`` named by a
  namespace, for when you decorate with Flask-Caching yourself.

Flask-Caching has no protection against concurrent misses; for it, use
:func:`alkey.readthrough.cached`, which takes a Flask-Caching ``Cache`` too.
``pip install 'alkey[flask-caching]'``. This module imports Flask-Caching only for type
checking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast

from alkey.keys import CacheKeyGenerator
from alkey.readthrough import FunctionKey

if TYPE_CHECKING:
    from flask_caching import Cache

__all__ = ["MemoizedFunction", "make_cache_key", "memoize"]

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)
_P = ParamSpec("_P")


class MemoizedFunction(Protocol[_P, _T_co]):
    """What :func:`memoize` returns: Flask-Caching's cached function, whose
    ``make_cache_key(*args, **kwargs)`` is alkey's key of a call (to ``cache.delete()``
    an entry, say) and whose ``uncached`` is the function itself."""

    @property
    def uncached(self) -> Callable[_P, _T_co]:
        """The function undecorated: calls it without the cache."""

    @property
    def make_cache_key(self) -> Callable[_P, str]:
        """The cache key of a call with these arguments."""

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _T_co:
        """The cached value for these arguments, computed on a miss."""


def make_cache_key(
    namespace: str, *, key_generator: Callable[..., str] | None = None
) -> Callable[..., str]:
    """A ``make_cache_key`` for Flask-Caching's ``@cache.cached()``: alkey's key of
    ``namespace`` and the decorated function's arguments, as it is called.

    For functions that take model instances (or identifiers): the key changes when a
    transaction that wrote one of their rows commits. A view called with URL values
    (``note_id=1``) names no row, so its key would never change: key such a view on the
    row's identifier instead, built before the view loads the row --
    ``make_cache_key=lambda note_id: key_generator(row_identifier("notes", note_id))``.
    ``key_generator`` makes the keys: by default a :class:`~alkey.keys.CacheKeyGenerator`
    on the default Redis client.
    """
    generator = key_generator if key_generator is not None else CacheKeyGenerator()

    def make(*args: Any, **kwargs: Any) -> str:
        return generator(namespace, args, kwargs)

    return make


def memoize(
    cache: Cache,
    *,
    timeout: int | None = None,
    namespace: str | None = None,
    key_generator: Callable[..., str] | None = None,
    **options: Any,
) -> Callable[[Callable[_P, _T]], MemoizedFunction[_P, _T]]:
    """Flask-Caching's ``@cache.cached()`` under alkey's key of the function and its
    arguments: a ``memoize`` for functions that take model instances.

    The key -- the function's module and qualified name, ``namespace`` and every
    argument, keyword arguments by name -- is built before the function runs, so a value
    computed from instances loaded before a concurrent commit is never served to a reader
    of the new data. ``timeout`` is Flask-Caching's (its ``CACHE_DEFAULT_TIMEOUT`` if
    ``None``); other keyword arguments (``unless``, ``response_filter``,
    ``cache_none=True`` to cache ``None``...) go to ``cache.cached()``. As there, an
    error building the key (an argument a key cannot be made of) is logged and the
    function called uncached, unless the application is in debug mode.
    """
    generator = key_generator if key_generator is not None else CacheKeyGenerator()

    def decorate(fn: Callable[_P, _T]) -> MemoizedFunction[_P, _T]:
        function_key = FunctionKey(fn, namespace)

        def make(*args: Any, **kwargs: Any) -> str:
            return generator(*function_key.arguments(*args, **kwargs))

        decorated = cache.cached(timeout=timeout, make_cache_key=make, **options)(fn)
        # Flask-Caching sets its request-path key builder here, which this function's
        # cache never uses; alkey's is the one that finds its entries.
        decorated.make_cache_key = make
        return cast("MemoizedFunction[_P, _T]", decorated)

    return decorate
