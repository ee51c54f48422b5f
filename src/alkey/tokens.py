"""Token stores: where the random tokens behind cache keys live.

:class:`TokenStore` is the seam: the key generator and the session listeners only ever
call ``fetch`` and ``bump``, so an asyncio, cluster or in-process store can stand in for
:class:`RedisTokenStore` without touching them.

Why no MULTI/WATCH is needed (the reasoning of alkey 0.3's ``invalidate_tokens``, kept):
every bump replaces a token by a *fresh random value*, independently for each key. Two
writers bumping the same token in any interleaving both leave a value that differs from
every value a reader saw before either commit, and that is all a cache key needs. A
missing token is created with ``SET NX``, so concurrent readers agree on the first one
written, and a token lost to eviction, expiry or a Redis restart comes back as a new
random value: keys built on it change, they never revert to an old key.
"""

from __future__ import annotations

import logging
import secrets
import threading
import weakref
from collections.abc import Collection, Sequence
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

import redis
from redis.exceptions import RedisError

from alkey.constants import DEFAULT_TOKEN_TTL, TOKEN_BYTES

__all__ = [
    "ErrorPolicy",
    "RedisTokenStore",
    "TokenStore",
    "new_token",
    "store_for",
]

log = logging.getLogger("alkey.tokens")

#: ``"degrade"``: Redis errors never reach the application (keys miss, bumps are kept and
#: replayed); ``"raise"``: they propagate as :class:`redis.exceptions.RedisError`.
ErrorPolicy: TypeAlias = Literal["degrade", "raise"]

#: The synchronous redis-py client type alkey works with.
RedisClient: TypeAlias = redis.Redis


def new_token() -> str:
    """A fresh random token (128 bits, URL-safe text)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


@runtime_checkable
class TokenStore(Protocol):
    """What alkey needs from a place that keeps tokens."""

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        """Return the current token of each identifier, creating missing ones, in order."""
        ...

    def bump(self, identifiers: Collection[str]) -> None:
        """Give each identifier a new random token."""
        ...


class RedisTokenStore:
    """Tokens in Redis, one string key per identifier, one round trip per call.

    ``fetch`` sends ``SET key <random> NX EX ttl`` for every identifier and one ``MGET``
    in a single pipeline: existing tokens are untouched, missing ones are created
    atomically (the first writer wins), and all values come back in the same round trip.
    No Lua script is involved, so there is no ``NOSCRIPT`` case after a Redis restart.

    ``bump`` sends ``SET key <random> EX ttl`` for every identifier in one pipeline.

    With ``on_error="degrade"`` (the default), a Redis error never reaches the caller:

    * ``fetch`` returns fresh random tokens, so the key is a guaranteed cache miss;
    * ``bump`` keeps the identifiers (up to ``max_pending``) and sends them again in front
      of the next ``fetch`` or ``bump`` of this store, in the same pipeline. A key this
      process generates after Redis recovers therefore never reuses a token from before
      a write that committed during the outage.

    Each outage is logged once when it starts and once when it ends, on the
    ``alkey.tokens`` logger, with counts.

    Share one store per Redis (``store_for(client)`` does this) so that the key generator
    sees the bumps that the session listeners could not send yet.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl: int = DEFAULT_TOKEN_TTL,
        key_prefix: str = "",
        on_error: ErrorPolicy = "degrade",
        max_pending: int = 100_000,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if on_error not in ("degrade", "raise"):
            raise ValueError(f"on_error must be 'degrade' or 'raise', not {on_error!r}")
        self.client = client
        self.ttl = ttl
        self.key_prefix = key_prefix
        self.on_error: ErrorPolicy = on_error
        self.max_pending = max_pending
        self._pending: set[str] = set()
        self._dropped = 0
        self._failing = False
        self._lock = threading.Lock()

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump is waiting for Redis to answer again."""
        with self._lock:
            return frozenset(self._pending)

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        if not identifiers:
            return []
        replay = self.pending
        keys = [self.key_prefix + identifier for identifier in identifiers]
        pipe = self.client.pipeline(transaction=False)
        self._queue_bumps(pipe, replay)
        for key in keys:
            pipe.set(key, new_token(), nx=True, ex=self.ttl)
        pipe.mget(keys)
        try:
            values = pipe.execute()[-1]
        except RedisError as error:
            self._failed(error, "fetch tokens")
            return [new_token() for _ in identifiers]
        self._succeeded(replay)
        return [_text(value) for value in values]

    def bump(self, identifiers: Collection[str]) -> None:
        replay = self.pending
        todo = replay.union(identifiers)
        if not todo:
            return
        pipe = self.client.pipeline(transaction=False)
        self._queue_bumps(pipe, todo)
        try:
            pipe.execute()
        except RedisError as error:
            self._keep(identifiers)
            self._failed(error, f"bump {len(todo)} token(s)")
            return
        self._succeeded(replay)

    def _queue_bumps(self, pipe: Any, identifiers: Collection[str]) -> None:
        for identifier in identifiers:
            pipe.set(self.key_prefix + identifier, new_token(), ex=self.ttl)

    def _keep(self, identifiers: Collection[str]) -> None:
        with self._lock:
            for identifier in identifiers:
                if len(self._pending) >= self.max_pending and identifier not in self._pending:
                    self._dropped += 1
                else:
                    self._pending.add(identifier)

    def _failed(self, error: RedisError, action: str) -> None:
        if self.on_error == "raise":
            raise error
        with self._lock:
            first = not self._failing
            self._failing = True
            pending, dropped = len(self._pending), self._dropped
        if first:
            # The exception text never contains the password: redis-py formats errors
            # from host and port only.
            log.warning(
                "Redis unavailable, alkey could not %s: %s: %s. Keys miss until it answers; "
                "%d bump(s) kept for replay, %d dropped (max_pending=%d).",
                action,
                type(error).__name__,
                error,
                pending,
                dropped,
                self.max_pending,
            )

    def _succeeded(self, replayed: frozenset[str]) -> None:
        if not self._failing and not replayed:
            return
        with self._lock:
            self._pending.difference_update(replayed)
            recovered, self._failing = self._failing, False
            dropped, self._dropped = self._dropped, 0
        if recovered:
            log.log(
                logging.ERROR if dropped else logging.INFO,
                "Redis answers again; alkey replayed %d bump(s), %d could not be kept.",
                len(replayed),
                dropped,
            )


def _text(value: bytes | str | None) -> str:
    if value is None:  # pragma: no cover - SET NX in the same pipeline makes it exist
        # Only possible if the key expired between SET NX and MGET: a miss, never stale.
        return new_token()
    return value.decode("ascii") if isinstance(value, bytes) else value


_stores: weakref.WeakKeyDictionary[Any, RedisTokenStore] = weakref.WeakKeyDictionary()
_stores_lock = threading.Lock()


def store_for(client: RedisClient) -> RedisTokenStore:
    """The process's shared :class:`RedisTokenStore` for ``client``'s connection pool.

    Clients created per request from one pool share one store, and with it the bumps
    that wait for an outage to end.
    """
    pool = client.connection_pool
    with _stores_lock:
        store = _stores.get(pool)
        if store is None:
            store = _stores[pool] = RedisTokenStore(client)
        return store
