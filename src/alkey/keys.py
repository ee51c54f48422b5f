"""Cache keys that change by themselves when the rows they depend on are written.

A key is a hash of the arguments, in which every model instance, mapped class, table or
identifier is replaced by its identifier *and its current token*. A committed write bumps
the token, so the next key differs and the cached value is regenerated; reads and
rolled-back work change no token, so everything else keeps hitting.

This module only *generates keys*: it stores nothing. (It was ``alkey.cache`` before
alkey 1.0, a name that promised a cache; ``alkey.cache`` still re-exports its names.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Final

from sqlalchemy.exc import MissingGreenlet

from alkey import identity
from alkey._canonical import Chunk, encode_arguments
from alkey.client import UsesDefaultStore, get_redis_client
from alkey.constants import MAX_KEY_LENGTH
from alkey.identity import UNKNOWN_WRITES, dependencies
from alkey.tokens import RedisClient, TokenStore, store_for

__all__ = ["CacheKeyGenerator", "KeyPlan", "get_cache_key_generator", "get_token"]

#: Hex digits of the SHA-256 digest that ends every key.
DIGEST_LENGTH: Final = 64
#: Longest prefix that still keeps a key within :data:`~alkey.constants.MAX_KEY_LENGTH`.
MAX_PREFIX_LENGTH: Final = MAX_KEY_LENGTH - DIGEST_LENGTH
# Versioned, so that a future change of the encoding can never collide with old keys.
# (It predates the module's name, alkey.keys: renaming it would change every key.)
_DOMAIN: Final = b"alkey.cache-key.v3\x00"


def _check_prefix(prefix: str) -> str:
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise ValueError(
            f"prefix is {len(prefix)} characters long; at most {MAX_PREFIX_LENGTH} keep keys "
            f"within {MAX_KEY_LENGTH} bytes"
        )
    bad = [char for char in prefix if not ("!" <= char <= "~")]
    if bad:
        raise ValueError(
            f"prefix {prefix!r} contains {bad[0]!r}; use printable ASCII without spaces "
            "(memcached and most caches reject the rest)"
        )
    return prefix


class CacheKeyGenerator(UsesDefaultStore):
    """Generate cache keys from any mix of model instances, identifiers and plain values.

    ``key_generator(user, 'sidebar')`` returns the same key until a transaction that
    wrote ``user`` commits, and a new one after. Arguments may be:

    * model instances (their row; an instance without a primary key stands for its table),
    * identifiers such as ``'alkey:users#1'`` or ``'alkey:users#*'``,
    * mapped classes or :class:`~sqlalchemy.schema.Table` objects (their table),
    * :data:`~alkey.constants.GLOBAL_WRITE_TOKEN` (any write at all),
    * plain values -- strings, numbers, bytes, dates, UUIDs, enums, ``None``, and lists,
      tuples, dicts and sets of them (nested model instances count as instances too), and
      objects with a meaningful ``str()``.

    Keys are deterministic across processes and runs, distinct argument lists never share
    a key, and every key is at most 250 printable ASCII characters: ``prefix`` followed by
    a 64-digit SHA-256. One call costs one Redis round trip however many instances it
    names, and none when it names none.

    Errors name the argument: a string that starts with ``alkey:`` but is not a valid
    identifier raises :class:`ValueError` (a typo must not make a key that never
    invalidates); a value with no stable text raises :class:`TypeError`.

    ``redis_client`` or ``tokens`` choose where tokens live; with neither, the client from
    :func:`alkey.client.get_redis_client` is used, looked up on first use.
    """

    def __init__(
        self,
        redis_client: RedisClient | None = None,
        *,
        tokens: TokenStore | None = None,
        prefix: str = "",
    ) -> None:
        if tokens is not None and redis_client is not None:
            raise ValueError("pass either redis_client or tokens, not both")
        self._tokens = (
            tokens
            if tokens is not None
            else (store_for(redis_client) if redis_client is not None else None)
        )
        self.prefix = _check_prefix(prefix)

    def __call__(self, *args: object) -> str:
        try:
            plan = self.plan(*args)
        except MissingGreenlet as error:
            raise TypeError(
                "an instance in these arguments belongs to an AsyncSession, which loads its "
                "expired attributes only with await: build its key with "
                "alkey.asyncio.AsyncCacheKeyGenerator"
            ) from error
        return plan.finish(self.tokens.fetch(plan.identifiers))

    def plan(self, *args: object) -> KeyPlan:
        """Encode ``args`` and list the identifiers whose tokens the key needs.

        The first half of a key generation, without I/O: an asyncio generator fetches the
        tokens with ``await`` and calls :meth:`KeyPlan.finish`, so both produce the same
        key from the same tokens.
        """
        return KeyPlan(self.prefix, encode_arguments(args))


class KeyPlan:
    """The encoded arguments of one key, waiting for their tokens.

    :attr:`identifiers` lists every token to fetch: those the arguments name, then the
    unknown-rows tokens that their rows depend on (see :func:`alkey.identity.dependencies`)
    and, once anything is named, the token that writes to unknown tables bump.
    """

    __slots__ = ("_head", "identifiers", "prefix")

    def __init__(self, prefix: str, chunks: list[Chunk]) -> None:
        #: The generator's prefix, which starts the key.
        self.prefix = prefix
        references = [chunk for chunk in chunks if type(chunk) is str]
        unique = dict.fromkeys(references)
        named = list(unique)
        needs = [*dependencies(named), UNKNOWN_WRITES] if named else []
        #: Each token to fetch once: the named ones first, in order of appearance.
        self.identifiers: list[str] = named + [need for need in needs if need not in unique]
        # Everything but the tokens, hashed at once by finish(): the encoded arguments,
        # a "k" where each identifier goes (the head is self-delimiting), then the
        # identifiers in that order, NUL-terminated (identifiers hold no NUL). The tokens
        # follow in the order of `identifiers`, which the head determines.
        self._head = b"".join(
            [
                _DOMAIN,
                *[chunk if type(chunk) is bytes else b"k" for chunk in chunks],
                "\0".join(references).encode(),
                b"\0",
            ]
        )

    def finish(self, tokens: Sequence[str]) -> str:
        """The key, given the current token of each of :attr:`identifiers`, in order."""
        if len(tokens) != len(self.identifiers):
            raise ValueError(f"expected {len(self.identifiers)} tokens, got {len(tokens)}")
        # NUL-separated -- one join and one encode, in C, however many instances the key
        # names -- as alkey's tokens hold no NUL; a token that does (written into Redis by
        # something else) has every token framed by its length instead.
        joined = "\0".join(tokens)
        digest = hashlib.sha256(self._head)
        if joined.count("\0") == len(tokens) - 1 or not tokens:
            digest.update(b"j" + joined.encode())
        else:
            digest.update(b"f" + "".join(f"{len(token)}:{token}" for token in tokens).encode())
        return self.prefix + digest.hexdigest()


def get_cache_key_generator(request: Any = None, *, prefix: str = "") -> CacheKeyGenerator:
    """A :class:`CacheKeyGenerator` on the Redis client for ``request``.

    With a Pyramid ``request`` (or anything with a ``registry``), a registered
    :class:`~alkey.interfaces.IRedisClientFactory` or
    :class:`~alkey.interfaces.IRedisConnectionPool` is used; otherwise the process's
    default client, configured from the environment.
    """
    return CacheKeyGenerator(get_redis_client(request), prefix=prefix)


def get_token(redis_client: RedisClient, x: object) -> str:
    """The current token of an instance, class, table or identifier (created if missing).

    Useful to build keys by other means, or to watch invalidation happen.
    """
    return store_for(redis_client).fetch([identity.identifier_for(x)])[0]
