"""dogpile.cache's ``cache_on_arguments()`` on functions that take model instances.

dogpile.cache's default key generator joins ``str()`` of the arguments, and a model
instance's text does not change when its row is written: the decorated function keeps
returning the value cached before the write. Give the region (or one decorator) alkey's
key generator instead::

    from dogpile.cache import make_region
    from alkey.adapters.dogpile import function_key_generator

    region = make_region(function_key_generator=function_key_generator).configure(...)

    @region.cache_on_arguments()
    def card(note: Note, *, size: str = "full") -> str: ...

The key is built from the function's module and qualified name, the decorator's
namespace and every argument -- keyword arguments by name, which dogpile's default
refuses -- before the function runs (see :class:`alkey.readthrough.FunctionKey`), and the
decorated function's ``invalidate()``, ``refresh()``, ``get()`` and ``set()`` use it too.
The region's ``get_or_create`` keeps its lock: concurrent misses compute once per process,
or across processes with a distributed lock (the Redis backend's
``distributed_lock=True``). To use a key generator of your own (a prefix, a client)::

    functools.partial(function_key_generator, key_generator=CacheKeyGenerator(client))

``pip install 'alkey[dogpile]'``. This module never imports dogpile.cache: it only
follows the signature dogpile calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from alkey.keys import CacheKeyGenerator
from alkey.readthrough import FunctionKey

__all__ = ["function_key_generator", "function_multi_key_generator"]


def function_key_generator(
    namespace: str | None,
    fn: Callable[..., Any],
    to_str: Callable[[Any], str] = str,
    *,
    key_generator: Callable[..., str] | None = None,
) -> Callable[..., str]:
    """A dogpile.cache ``function_key_generator`` whose keys change when a transaction
    that wrote a row in the arguments commits.

    ``namespace``, ``fn`` and ``to_str`` are what dogpile passes; ``to_str`` is not used,
    as alkey encodes each argument itself (a model instance by its row, its token and the
    state it holds; other values as :class:`~alkey.keys.CacheKeyGenerator` documents).
    A first parameter named ``self`` or ``cls`` is left out of the key, as dogpile's
    default does. ``key_generator`` makes the keys: by default a
    :class:`~alkey.keys.CacheKeyGenerator` on the default Redis client.
    """
    function_key = FunctionKey(fn, namespace)
    generator = key_generator if key_generator is not None else CacheKeyGenerator()

    def generate_key(*args: Any, **kwargs: Any) -> str:
        return generator(*function_key.arguments(*args, **kwargs))

    return generate_key


def function_multi_key_generator(
    namespace: str | None,
    fn: Callable[..., Any],
    to_str: Callable[[Any], str] = str,
    *,
    key_generator: Callable[..., str] | None = None,
) -> Callable[..., list[str]]:
    """A dogpile.cache ``function_multi_key_generator``, for
    ``cache_multi_on_arguments()``: one key per positional argument, each changing when a
    transaction that wrote that argument's rows commits.

    With a :class:`~alkey.keys.CacheKeyGenerator` (the default), all the keys of one call
    cost one Redis round trip together. Arguments are as for
    :func:`function_key_generator`.
    """
    function_key = FunctionKey(fn, namespace)
    generator = key_generator if key_generator is not None else CacheKeyGenerator()
    parameters = list(inspect.signature(fn).parameters)
    skip_first = bool(parameters) and parameters[0] in ("self", "cls")

    def generate_keys(*args: Any) -> list[str]:
        values = args[1:] if skip_first else args
        name, space = function_key.name, function_key.namespace
        if not isinstance(generator, CacheKeyGenerator):
            return [generator(name, space, value) for value in values]
        plans = [generator.plan(name, space, value) for value in values]
        identifiers = list(dict.fromkeys(i for plan in plans for i in plan.identifiers))
        fetched = generator.tokens.fetch(identifiers) if identifiers else []
        tokens = dict(zip(identifiers, fetched, strict=True))
        return [plan.finish([tokens[i] for i in plan.identifiers]) for plan in plans]

    return generate_keys
