"""Token stores: where the random tokens behind cache keys live.

:class:`TokenStore` is the seam: the key generator and the session listeners only ever
call ``fetch`` and ``bump``, so an asyncio, cluster or in-process store can stand in for
:class:`RedisTokenStore` without touching them.

Why no MULTI/WATCH is needed (the reasoning of alkey 0.3's ``invalidate_tokens``, kept):
every bump replaces a token by a *fresh random value*, independently for each key. Two
writers bumping the same token in any interleaving both leave a value that differs from
every value a reader saw before either commit, and that is all a cache key needs. A
missing token is created inside the fetch script, which Redis runs atomically, so
concurrent readers agree on the first one written; a token lost to eviction, expiry or a
Redis restart comes back as a new random value: keys built on it change, they never
revert to an old key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import redis
from redis.exceptions import NoScriptError, RedisError

from alkey.constants import DEFAULT_TOKEN_TTL, TOKEN_BYTES

__all__ = [
    "CHUNK_SIZE",
    "ErrorPolicy",
    "OutageLedger",
    "RedisTokenStore",
    "Replay",
    "ScriptCalls",
    "ScriptStore",
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

_Call: TypeAlias = "tuple[_Script, list[str], tuple[int, str]]"


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


# KEYS: token keys. ARGV[1]: TTL in seconds, ARGV[2]: a fresh random base. Returns the
# token of every key, creating missing ones as <base>.<position>: unique per key and call,
# and unpredictable, because the base is 128 random bits drawn for this call.
_FETCH_SCRIPT = """
local tokens = redis.call('MGET', unpack(KEYS))
for i = 1, #KEYS do
  if not tokens[i] then
    tokens[i] = ARGV[2] .. '.' .. i
    redis.call('SET', KEYS[i], tokens[i], 'EX', ARGV[1])
  end
end
return tokens
"""

# KEYS: token keys. ARGV as above. Gives every key a new token.
_BUMP_SCRIPT = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2] .. '.' .. i, 'EX', ARGV[1])
end
return #KEYS
"""

#: Keys per script call. Larger bumps are split into several calls sent in one pipeline
#: (still one round trip), which bounds the size of each command and of each script run.
CHUNK_SIZE = 1000


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("ascii")).hexdigest()


_FETCH = _Script(_FETCH_SCRIPT)
_BUMP = _Script(_BUMP_SCRIPT)


class OutageLedger:
    """What a token store owes Redis while it is unreachable, and the policy for it.

    Shared by the sync and asyncio stores, so they behave identically in an outage:

    * ``on_error="degrade"``: :meth:`failed` logs the first failure of an incident and
      returns; the store then answers with fresh random tokens (a guaranteed miss) or keeps
      the bump with :meth:`keep`, up to ``max_pending`` identifiers, for :meth:`replay`;
    * ``on_error="raise"``: :meth:`failed` re-raises the error.

    A store sends :meth:`replay` in front of its next call, in the same round trip, and
    reports with :meth:`succeeded`, which logs the end of the incident.

    While Redis is known to be down, a degrading store does not wait for it: for
    ``retry_interval`` seconds after each failure, :meth:`skip` tells it to answer at once
    (a miss, a kept bump) instead of paying a socket timeout on every call; the first call
    after that probes Redis again.
    """

    def __init__(
        self,
        on_error: ErrorPolicy = "degrade",
        max_pending: int = 100_000,
        retry_interval: float = 1.0,
    ) -> None:
        if on_error not in ("degrade", "raise"):
            raise ValueError(f"on_error must be 'degrade' or 'raise', not {on_error!r}")
        if retry_interval < 0:
            raise ValueError(f"retry_interval must not be negative, not {retry_interval!r}")
        self.on_error: ErrorPolicy = on_error
        self.max_pending = max_pending
        self.retry_interval = retry_interval
        self._next_probe = 0.0
        # identifier -> generation of its latest failed bump. A replay only clears the
        # generations it sent, so a bump that failed meanwhile stays owed.
        self._pending: dict[str, int] = {}
        self._generation = 0
        self._dropped = 0
        self._failing = False
        self._lock = threading.Lock()

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump is waiting for Redis to answer again."""
        with self._lock:
            return frozenset(self._pending)

    def replay(self) -> Replay:
        """The bumps to send in front of the next call (usually none: no lock taken)."""
        if not self._pending:
            return _NOTHING
        with self._lock:
            return Replay(self._pending)

    def skip(self) -> bool:
        """Whether to answer without Redis now: it failed less than ``retry_interval`` ago."""
        return self._failing and self.on_error == "degrade" and time.monotonic() < self._next_probe

    def keep(self, identifiers: Collection[str]) -> None:
        with self._lock:
            self._generation += 1
            for identifier in identifiers:
                if len(self._pending) >= self.max_pending and identifier not in self._pending:
                    self._dropped += 1
                else:
                    self._pending[identifier] = self._generation

    def failed(self, error: Exception, action: str) -> None:
        if self.on_error == "raise":
            raise error
        with self._lock:
            first = not self._failing
            self._failing = True
            self._next_probe = time.monotonic() + self.retry_interval
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

    def succeeded(self, replayed: Replay) -> None:
        if not self._failing and not replayed:
            return
        with self._lock:
            for identifier, generation in replayed.generations.items():
                if self._pending.get(identifier) == generation:
                    del self._pending[identifier]
            recovered, self._failing = self._failing, False
            dropped, self._dropped = self._dropped, 0
        if recovered:
            log.log(
                logging.ERROR if dropped else logging.INFO,
                "Redis answers again; alkey replayed %d bump(s), %d could not be kept.",
                len(replayed),
                dropped,
            )


class Replay(frozenset[str]):
    """Identifiers to bump again, remembering which failure of each is being replayed."""

    generations: dict[str, int]

    def __new__(cls, generations: dict[str, int]) -> Replay:
        replay = super().__new__(cls, generations)
        replay.generations = dict(generations)
        return replay


_NOTHING = Replay({})


class ScriptCalls:
    """Builds the script calls of a fetch or bump, and reads a fetch's answer.

    Pure bookkeeping, no I/O: the sync and asyncio stores send the calls themselves.
    """

    def __init__(self, ttl: int = DEFAULT_TOKEN_TTL, key_prefix: str = "") -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        self.key_prefix = key_prefix

    def _calls(self, script: _Script, identifiers: Collection[str]) -> list[_Call]:
        prefix = self.key_prefix
        keys = [prefix + identifier for identifier in identifiers] if prefix else list(identifiers)
        return [
            (script, keys[start : start + CHUNK_SIZE], (self.ttl, new_token()))
            for start in range(0, len(keys), CHUNK_SIZE)
        ]

    def bump(self, identifiers: Collection[str]) -> list[_Call]:
        return self._calls(_BUMP, identifiers) if identifiers else []

    def fetch(self, identifiers: Sequence[str], replay: Collection[str]) -> list[_Call]:
        """The replayed bumps first, then the fetch."""
        return [*self.bump(replay), *self._calls(_FETCH, identifiers)]

    @staticmethod
    def tokens(results: list[Any], identifiers: Sequence[str]) -> list[str]:
        """The fetched tokens, in order, from the results of :meth:`fetch`'s calls."""
        tokens: list[str] = []
        for values in results[-math.ceil(len(identifiers) / CHUNK_SIZE) :]:
            tokens.extend([v.decode("ascii") if type(v) is bytes else v for v in values])
        return tokens

    @staticmethod
    def loaded_after(loaded: frozenset[str], calls: list[_Call]) -> frozenset[str]:
        return loaded.union(script.sha for script, _, _ in calls)

    @staticmethod
    def commands(calls: list[_Call], loaded: frozenset[str]) -> list[tuple[Any, ...]]:
        """The Redis commands for ``calls``: ``EVALSHA`` for scripts in ``loaded``, else
        ``EVAL`` with the source (which also loads it)."""
        return [
            ("EVALSHA", script.sha, len(keys), *keys, *args)
            if script.sha in loaded
            else ("EVAL", script.source, len(keys), *keys, *args)
            for script, keys, args in calls
        ]

    @staticmethod
    def checked(results: list[Any]) -> list[Any]:
        """A pipeline's results, raising the first error among them."""
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results


class UsesDefaultStore:
    """Gives a class a ``tokens`` attribute that, left unset, becomes the store of the
    process's default client on first use -- so that binding or building at import time
    never connects to Redis."""

    _tokens: TokenStore | None

    @property
    def tokens(self) -> TokenStore:
        """The token store in use (the default client's, looked up on first use)."""
        if self._tokens is None:
            from alkey.client import get_redis_client  # client.py imports this module

            self._tokens = store_for(get_redis_client())
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: TokenStore) -> None:
        self._tokens = tokens


class ScriptStore:
    """What the sync and asyncio Redis stores share: settings, outage ledger, which
    scripts the server has seen, and how a store is shared through its connection pool;
    they differ only in how they wait for Redis."""

    #: Where on a connection pool the pool's shared store of this kind lives.
    pool_attribute: ClassVar[str]

    def __init__(
        self,
        *,
        ttl: int = DEFAULT_TOKEN_TTL,
        key_prefix: str = "",
        on_error: ErrorPolicy = "degrade",
        max_pending: int = 100_000,
        retry_interval: float = 1.0,
    ) -> None:
        self.calls = ScriptCalls(ttl, key_prefix)
        self.outage = OutageLedger(on_error, max_pending, retry_interval)
        self._loaded: frozenset[str] = frozenset()

    @property
    def pending(self) -> frozenset[str]:
        """Identifiers whose bump is waiting for Redis to answer again."""
        return self.outage.pending

    def _share_through(self, pool: Any) -> None:
        """Become the store that :func:`shared_store` returns for ``pool``: it lives on
        the pool, as long as the pool and no longer."""
        with _stores_lock:
            setattr(pool, self.pool_attribute, self)


_Store = TypeVar("_Store", bound=ScriptStore)
_stores_lock = threading.RLock()


def shared_store(pool: Any, kind: type[_Store], make: Callable[[], _Store]) -> _Store:
    """The store of ``kind`` most recently created on ``pool``, else ``make()``'s."""
    store = getattr(pool, kind.pool_attribute, None)
    if isinstance(store, kind):
        return store
    with _stores_lock:  # reentrant: the new store shares itself under it
        store = getattr(pool, kind.pool_attribute, None)
        return store if isinstance(store, kind) else make()


class RedisTokenStore(ScriptStore):
    """Tokens in Redis, one string key per identifier, one round trip per call.

    ``fetch`` runs one small Lua script over all the keys: existing tokens are returned
    untouched, missing ones are created atomically (``SET`` inside the script, so
    concurrent readers agree on the first one written). ``bump`` runs another that gives
    every key a new random token. The first call of each script sends its source
    (``EVAL``, which also loads it), later ones only its SHA (``EVALSHA``); after a Redis
    restart or ``SCRIPT FLUSH`` one call is answered ``NOSCRIPT`` and sent again with the
    source. No call ever pays for a ``SCRIPT EXISTS`` round trip.

    Scripts need all their keys on one node. A cluster-aware store (not part of alkey yet)
    would group keys by hash slot
    and sends one such call per slot in one pipeline per node, behind the same
    :class:`TokenStore` protocol.

    With ``on_error="degrade"`` (the default), a Redis error never reaches the caller:

    * ``fetch`` returns fresh random tokens, so the key is a guaranteed cache miss;
    * ``bump`` keeps the identifiers (up to ``max_pending``) and sends them again in front
      of the next ``fetch`` or ``bump`` of this store, in the same round trip. A key this
      process generates after Redis recovers therefore never reuses a token from before
      a write that committed during the outage.

    Each outage is logged once when it starts and once when it ends, on the
    ``alkey.tokens`` logger, with counts (see :class:`OutageLedger`).

    Share one store per Redis (``store_for(client)`` does this) so that the key generator
    sees the bumps that the session listeners could not send yet.
    """

    pool_attribute = "_alkey_token_store"

    def __init__(
        self,
        client: RedisClient,
        *,
        ttl: int = DEFAULT_TOKEN_TTL,
        key_prefix: str = "",
        on_error: ErrorPolicy = "degrade",
        max_pending: int = 100_000,
        retry_interval: float = 1.0,
    ) -> None:
        super().__init__(
            ttl=ttl,
            key_prefix=key_prefix,
            on_error=on_error,
            max_pending=max_pending,
            retry_interval=retry_interval,
        )
        self.client = client
        self._share_through(client.connection_pool)

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        if not identifiers:
            return []
        if self.outage.skip():
            return [new_token() for _ in identifiers]
        replay = self.outage.replay()
        try:
            results = self._run(self.calls.fetch(identifiers, replay))
        except RedisError as error:
            self.outage.failed(error, "fetch tokens")
            return [new_token() for _ in identifiers]
        self.outage.succeeded(replay)
        return self.calls.tokens(results, identifiers)

    def bump(self, identifiers: Collection[str]) -> None:
        if self.outage.skip():
            self.outage.keep(identifiers)
            return
        replay = self.outage.replay()
        todo = replay.union(identifiers) if replay else identifiers
        if not todo:
            return
        try:
            self._run(self.calls.bump(todo))
        except RedisError as error:
            self.outage.keep(identifiers)
            self.outage.failed(error, f"bump {len(todo)} token(s)")
            return
        self.outage.succeeded(replay)

    def _run(self, calls: list[_Call]) -> list[Any]:
        """Send the script calls in one round trip.

        A script this store has not run yet goes out as ``EVAL`` with its source, which
        also loads it; after that, ``EVALSHA``. If Redis has forgotten it (restart,
        ``SCRIPT FLUSH``), the ``NOSCRIPT`` answer costs one more round trip, once.
        """
        try:
            results = self._send(calls, self._loaded)
        except NoScriptError:
            self._loaded = frozenset()
            results = self._send(calls, self._loaded)
        self._loaded = ScriptCalls.loaded_after(self._loaded, calls)
        return results

    def _send(self, calls: list[_Call], loaded: frozenset[str]) -> list[Any]:
        commands = ScriptCalls.commands(calls, loaded)
        if len(commands) == 1:
            return [self.client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return ScriptCalls.checked(pipe.execute(raise_on_error=False))


def store_for(client: RedisClient) -> RedisTokenStore:
    """The process's shared :class:`RedisTokenStore` for ``client``'s connection pool.

    That is the store most recently created on this pool -- so a store configured with
    ``RedisTokenStore(client, ttl=..., key_prefix=...)`` is the one that
    ``CacheKeyGenerator(client)``, ``get_token(client, ...)`` and
    ``bind(..., redis_client=client)`` use too -- or a new one with default settings.
    Clients created per request from one pool share it, and with it the bumps that wait
    for an outage to end.
    """
    return shared_store(client.connection_pool, RedisTokenStore, lambda: RedisTokenStore(client))
