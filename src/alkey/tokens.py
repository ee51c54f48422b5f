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

import atexit
import contextlib
import hashlib
import inspect
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from typing import Any, ClassVar, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import redis
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError

from alkey.constants import DEFAULT_TOKEN_TTL, TOKEN_BYTES, UNKNOWN_WRITES

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_LEASE",
    "DurableTokenStore",
    "ErrorPolicy",
    "Exchange",
    "OutageLedger",
    "RedisTokenStore",
    "Replay",
    "ScriptCalls",
    "ScriptStore",
    "TokenStore",
    "intend",
    "new_token",
    "store_for",
]

log = logging.getLogger("alkey.tokens")

#: ``"degrade"``: Redis errors never reach the application (keys miss, bumps are kept and
#: replayed); ``"raise"``: they propagate as :class:`redis.exceptions.RedisError`.
ErrorPolicy: TypeAlias = Literal["degrade", "raise"]

#: The synchronous redis-py client type alkey works with.
RedisClient: TypeAlias = redis.Redis

_Call: TypeAlias = "tuple[_Script, list[str], tuple[Any, ...]]"
_R = TypeVar("_R")
#: One call of a store (a fetch, a bump, an intent) as the round trips it needs: the
#: generator yields the script calls of each round trip and is sent their results, or
#: thrown the :class:`~redis.exceptions.RedisError` that stopped them; it returns the
#: call's answer. :class:`ScriptStore` writes each call once, as such a generator, and
#: the sync and asyncio stores only differ in how they wait for the round trips.
Exchange: TypeAlias = "Generator[list[_Call], list[Any], _R]"


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


@runtime_checkable
class DurableTokenStore(TokenStore, Protocol):
    """A token store that can survive the death of a process between commit and bump.

    The listeners call :meth:`intend` just before the database COMMIT and pass what it
    returned to :meth:`bump` right after it. A store that wrote the intent down somewhere
    shared can bump on behalf of a process that died in between (see
    :class:`RedisTokenStore`'s ``durable`` mode).
    """

    def intend(self, identifiers: Collection[str]) -> str | None:
        """Record that ``identifiers`` are about to be bumped; return the record's id
        (``None`` when nothing was recorded)."""
        ...

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """Give each identifier a new random token, and forget ``intent``."""
        ...


def intend(tokens: TokenStore, identifiers: Collection[str]) -> str | None:
    """``tokens.intend(identifiers)`` if ``tokens`` is a :class:`DurableTokenStore`.

    Called from inside SQLAlchemy's commit, just before the COMMIT, where an exception
    would abort it half-way (SQLAlchemy would skip the COMMIT yet hand the connection back
    to its pool with the transaction still open). So this never raises: whatever the
    store's policy, a failure is logged and the commit goes ahead without an intent; its
    bump follows as usual, and raises then under ``on_error="raise"``.
    """
    record = getattr(tokens, "intend", None)
    if record is None or not identifiers:
        return None
    try:
        intent: str | None = record(identifiers)
    except RedisError as error:  # on_error="raise": the bump will raise it, after the COMMIT
        log.debug("alkey could not record the bumps of a commit: %s", error)
        return None
    except Exception:
        log.exception("alkey could not record the bumps of a commit; it goes ahead without")
        return None
    return intent


def bump(tokens: TokenStore, identifiers: Collection[str], intent: str | None) -> None:
    """Bump ``identifiers`` in ``tokens``, clearing ``intent`` (from :func:`intend`)."""
    if intent is None:
        tokens.bump(identifiers)
    else:
        assert isinstance(tokens, DurableTokenStore)
        tokens.bump(identifiers, intent=intent)


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

# Durable mode. KEYS[1]: the intents (a sorted set: intent id -> server time it was
# written), KEYS[2]: their identifiers (a hash: intent id -> identifiers, one per line).
# Both names share a hash tag, so a cluster would keep them on one node.

# ARGV[1]: intent id, ARGV[2]: identifiers. Written just before the database COMMIT.
_INTEND_SCRIPT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], now[1] + now[2] / 1000000, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# ARGV: intent ids whose bump has been done. Sent in the bump's own pipeline, which is
# not a transaction: it must fail whenever the bump does. The one failure they would not
# share is a full Redis (maxmemory, noeviction), which refuses the bump's SET but not
# ZREM. So the script starts with a ZADD that adds nothing (XX: only existing members)
# yet, like SET, may grow memory: Redis refuses it in a full Redis and stops the script
# there, leaving the intent for a claimer.
_CLEAR_SCRIPT = """
redis.call('ZADD', KEYS[1], 'XX', 0, '')
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return #ARGV
"""

# ARGV[1]: lease in seconds, ARGV[2]: most intents to claim. Returns id, identifiers, ...
# of the intents older than the lease, and leases them again to the caller, who bumps
# them and clears them; if the caller dies too, they fall due again a lease later.
_CLAIM_SCRIPT = """
local now = redis.call('TIME')
now = now[1] + now[2] / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]),
                       'LIMIT', 0, tonumber(ARGV[2]))
local claimed = {}
for _, id in ipairs(due) do
  local identifiers = redis.call('HGET', KEYS[2], id)
  if identifiers then
    redis.call('ZADD', KEYS[1], now, id)
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = identifiers
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return claimed
"""

#: Seconds after which any alkey process bumps a commit's intent that was not cleared.
DEFAULT_LEASE = 5.0

#: Intents one claim takes at most: the size of one batch of a recovery, so that no single
#: script run or round trip grows with the backlog.
CLAIM_LIMIT = 100

#: Seconds one call may spend claiming further batches of a backlog of due intents, on
#: top of its own round trip and the bump of the last batch it claimed (see
#: :meth:`ScriptStore._recover`): a few dozen batches of :data:`CLAIM_LIMIT` on a local
#: Redis. The rest is left to the next calls, which claim at once.
RECOVERY_BUDGET = 0.05

#: Seconds a call waits for a connection from an exhausted pool when its client has no
#: socket timeout to go by (otherwise it waits that long: see :meth:`ScriptStore.waits`).
POOL_WAIT = 2.0

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
_INTEND = _Script(_INTEND_SCRIPT)
_CLEAR = _Script(_CLEAR_SCRIPT)
_CLAIM = _Script(_CLAIM_SCRIPT)


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

    Past ``max_pending`` identifiers, a kept bump is replaced by a bump of
    :data:`~alkey.identity.UNKNOWN_WRITES`, which every key depends on: memory stays
    bounded and nothing is lost, at the price of a miss for every key once it is replayed.

    For ``recovery_window`` seconds after an outage ends (``2 * retry_interval``, plus
    the store's socket timeout), :meth:`recovering` tells
    the store to answer fetches with misses: other processes may still owe Redis bumps of
    writes they committed during the outage. They replay them from the background as soon
    as Redis answers -- at most a socket timeout plus ``retry_interval`` after it is back,
    when configured alike -- so a key made before then could still use a token from before
    one of those writes.

    A connection pool with no connection left (``max_connections``) is no outage: Redis
    answers every other caller. The store has already waited for a connection by then
    (:meth:`ScriptStore.waits`); :meth:`exhausted` only lets that one call go without
    Redis -- a miss, a kept bump -- and marks nothing down, so the other calls go on using
    Redis, and the next call that gets a connection replays the kept bump in front.
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
        #: Seconds after an outage during which fetches answer misses (see the class); the
        #: stores add their client's socket timeout.
        self.recovery_window = 2 * retry_interval
        self._next_probe = 0.0
        # identifier -> generation of its latest failed bump. A replay only clears the
        # generations it sent, so a bump that failed meanwhile stays owed.
        self._pending: dict[str, int] = {}
        self._generation = 0
        self._dropped = 0
        self._failing = False
        self._recovering_until = 0.0
        # Calls that went without Redis because the pool had no connection for them, since
        # the last call that had one (0: no such incident).
        self._starved = 0
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

    def probe_now(self) -> None:
        """Let the next call try Redis even if it failed less than ``retry_interval`` ago:
        for a last attempt, when no later call will come (interpreter exit)."""
        self._next_probe = 0.0

    def recovering(self) -> bool:
        """Whether an outage ended less than ``recovery_window`` ago: answer misses."""
        return self._recovering_until > 0.0 and time.monotonic() < self._recovering_until

    def keep(self, identifiers: Collection[str]) -> None:
        with self._lock:
            self._generation += 1
            for identifier in identifiers:
                if len(self._pending) >= self.max_pending and identifier not in self._pending:
                    self._dropped += 1
                    # In its place, the token every key depends on (one slot over the bound).
                    self._pending[UNKNOWN_WRITES] = self._generation
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
                "%d bump(s) kept for replay, %d over max_pending=%d.",
                action,
                type(error).__name__,
                error,
                pending,
                dropped,
                self.max_pending,
            )

    def exhausted(self, error: RedisError, action: str) -> None:
        """A call waited in vain for a connection from its pool: it goes without Redis
        (a miss, a kept bump), and the next calls try Redis as usual.

        Unlike :meth:`failed`, this marks nothing down: Redis answers, only this process
        ran out of connections, so turning the cache off for every call (and asking every
        fetch to miss for a recovery window) would be wrong. Logged once per incident --
        until a call gets a connection again -- and raised under ``on_error="raise"``.
        """
        if self.on_error == "raise":
            raise error
        with self._lock:
            self._starved += 1
            first = self._starved == 1
            pending = len(self._pending)
        if first:
            log.warning(
                "alkey could not %s: %s: %s, even after waiting for a connection of its "
                "Redis pool (max_connections). Redis is not marked down: this call goes "
                "without it (a miss, or a bump kept for replay; %d kept) and the next "
                "ones use it as usual.",
                action,
                type(error).__name__,
                error,
                pending,
            )

    def succeeded(self, replayed: Replay) -> None:
        if not self._failing and not replayed and not self._starved:
            return
        with self._lock:
            for identifier, generation in replayed.generations.items():
                if self._pending.get(identifier) == generation:
                    del self._pending[identifier]
            recovered, self._failing = self._failing, False
            dropped, self._dropped = self._dropped, 0
            starved, self._starved = self._starved, 0
            if recovered:
                self._recovering_until = time.monotonic() + self.recovery_window
        if starved:
            log.info(
                "alkey gets Redis connections from its pool again; %d call(s) went without "
                "one meanwhile.",
                starved,
            )
        if recovered:
            log.log(
                logging.WARNING if dropped else logging.INFO,
                "Redis answers again; alkey replayed %d bump(s)%s.",
                len(replayed),
                f", and bumped {UNKNOWN_WRITES} for {dropped} more past max_pending"
                if dropped
                else "",
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
        #: Where durable mode keeps intents. No identifier can take these names: every
        #: identifier has a ``#``.
        self.intent_keys = [f"{key_prefix}alkey:{{intents}}", f"{key_prefix}alkey:{{intents}}:data"]

    def _calls(self, script: _Script, identifiers: Collection[str]) -> list[_Call]:
        prefix = self.key_prefix
        keys = [prefix + identifier for identifier in identifiers] if prefix else list(identifiers)
        return [
            (script, keys[start : start + CHUNK_SIZE], (self.ttl, new_token()))
            for start in range(0, len(keys), CHUNK_SIZE)
        ]

    def bump(self, identifiers: Collection[str], intents: Collection[str] = ()) -> list[_Call]:
        """The bump, then the clearing of the intents it carries out."""
        calls = self._calls(_BUMP, identifiers) if identifiers else []
        if intents:
            calls.append((_CLEAR, self.intent_keys, tuple(intents)))
        return calls

    def intend(self, intent: str, identifiers: Collection[str]) -> list[_Call]:
        return [(_INTEND, self.intent_keys, (intent, "\n".join(identifiers)))]

    def claim(self, lease: float) -> _Call:
        return (_CLAIM, self.intent_keys, (lease, CLAIM_LIMIT))

    @staticmethod
    def claimed(result: list[Any]) -> dict[str, list[str]]:
        """The identifiers of each intent a claim returned, by intent id."""
        text = [v.decode("ascii") if type(v) is bytes else str(v) for v in result]
        return {text[i]: text[i + 1].split("\n") for i in range(0, len(text) - 1, 2)}

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


class _Recoveries:
    """The recoveries a store runs -- bumps of due intents on behalf of writers that died
    between their COMMIT and their bump -- seen as incidents.

    A backlog of due intents is drained in batches of :data:`CLAIM_LIMIT`, possibly over
    several calls and by several threads or tasks at once, yet it is one incident, logged
    once: a warning when it begins, with its first batch's count, and, unless that batch
    was all of it, one line when it ends, with the total. While a recovery runs, or one
    left intents due (a full last batch), :meth:`busy` tells fetches to miss: a token read
    then may be one that the recovery is about to replace.
    """

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self._lock = threading.Lock()
        self._running = 0  # recoveries in progress in this store
        self._backlog = False  # the last batch was full, and nobody claimed after it
        self._incident = False  # an incident was logged as begun, and not as ended
        self._total = 0  # commits bumped since the last incident ended

    def busy(self) -> bool:
        """Whether a fetch must miss: a recovery runs here, or left intents due."""
        return self._backlog or self._running > 0

    def began(self, claimed: int) -> None:
        """A recovery of ``claimed`` intents starts (its first batch)."""
        with self._lock:
            self._running += 1
            if self._incident:
                return
            alone = claimed < CLAIM_LIMIT and self._running == 1 and not self._backlog
            self._incident = not alone
        if alone:
            log.warning(
                "alkey bumps the tokens of %d commit(s) whose own bump did not arrive "
                "within the %gs lease: their process died between the database COMMIT "
                "and the bump, or could not reach Redis.",
                claimed,
                self.lease,
            )
        else:
            log.warning(
                "alkey bumps the tokens of %d commit(s) so far, and more are due, whose own "
                "bump did not arrive within the %gs lease: their process died between the "
                "database COMMIT and the bump, or could not reach Redis. Keys miss until "
                "they are all bumped.",
                claimed,
                self.lease,
            )

    def applied(self, claimed: int) -> None:
        """A batch of ``claimed`` intents was bumped and cleared."""
        with self._lock:
            self._total += claimed

    def ended(self, more_due: bool) -> None:
        """A recovery stops, leaving intents due (``more_due``) or not."""
        with self._lock:
            self._running -= 1
            self._backlog = more_due
        self._close()

    def none_due(self) -> None:
        """A claim found nothing due: no backlog left."""
        if self._backlog or self._incident:  # without the lock: the usual case is neither
            with self._lock:
                self._backlog = False
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._running or self._backlog:
                return
            total, self._total = self._total, 0
            logged, self._incident = self._incident, False
        if logged:
            log.info(
                "alkey has bumped the tokens of every commit whose own bump did not arrive "
                "within the %gs lease: %d in all.",
                self.lease,
                total,
            )


#: What redis-py's ``BlockingConnectionPool`` (sync and asyncio) raises, as a plain
#: ``ConnectionError``, when no connection came back within its ``timeout``.
_BLOCKING_POOL_TIMEOUT = ("No connection available.",)


def _fresh(identifiers: Sequence[str]) -> list[str]:
    """Tokens for a call that cannot use Redis's: new random ones, a guaranteed miss."""
    return [new_token() for _ in identifiers]


class ScriptStore:
    """What the sync and asyncio Redis stores share: settings, outage ledger, which
    scripts the server has seen, how a store is shared through its connection pool, and
    each call itself -- fetch, intend, bump and recovery -- written once as an
    :data:`Exchange`. The stores differ only in how they wait for Redis: they drive these
    generators, sending each yielded round trip with ``_run`` (which also waits for a
    connection of an exhausted pool, see :meth:`waits`)."""

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
        durable: bool = False,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be a positive number of seconds, not {lease!r}")
        self.calls = ScriptCalls(ttl, key_prefix)
        # The stores add their client's socket timeout to its recovery_window.
        self.outage = OutageLedger(on_error, max_pending, retry_interval)
        #: Whether commits record their intended bumps in Redis before the COMMIT.
        self.durable = durable
        #: Seconds after which any process bumps an intent that its writer did not clear.
        self.lease = lease
        #: The recoveries of due intents this store runs (durable mode).
        self.recoveries = _Recoveries(lease)
        #: Seconds a call waits for a connection when the pool has none free (see
        #: :meth:`waits`): the stores set it to their client's socket timeout.
        self.pool_wait = POOL_WAIT
        self._loaded: frozenset[str] = frozenset()
        self._next_claim = 0.0

    def waits(self) -> Iterator[float]:
        """The pauses of a call whose pool has no free connection
        (:class:`~redis.exceptions.MaxConnectionsError`), one before each new try: short
        and growing, ``pool_wait`` seconds in all; then the call goes without Redis
        (:meth:`OutageLedger.exhausted`).

        Why wait: alkey holds a connection for one round trip, so one is usually free again
        about a round trip later, while going without costs more -- a miss costs the
        application a query and a render, and a bump kept for replay leaves the other
        processes, whose Redis answers, on the old tokens until the replay. Why no longer
        than the client's socket timeout: that is how long the application lets a call
        wait for Redis anyway. The pool refuses before anything is sent, so trying again
        never sends a command twice.
        """
        deadline = time.monotonic() + self.pool_wait
        pause = 0.0005
        while (left := deadline - time.monotonic()) > 0:
            yield min(pause, left)
            pause = min(pause * 2, 0.005)

    def _replay_soon(self) -> None:
        """Replay the kept bumps without waiting for this process's next call (each store
        does it its own way: a thread, a task)."""
        raise NotImplementedError

    def _failed(self, error: RedisError, action: str) -> None:
        """A call could not reach Redis: an outage, or only an exhausted pool -- a
        ``ConnectionPool`` refused after :meth:`waits`, or a ``BlockingConnectionPool``
        after waiting its own ``timeout`` (it raises a bare ``ConnectionError`` then)."""
        if isinstance(error, MaxConnectionsError) or error.args == _BLOCKING_POOL_TIMEOUT:
            self.outage.exhausted(error, action)
        else:
            self.outage.failed(error, action)

    def _fetching(self, identifiers: Sequence[str]) -> Exchange[list[str]]:
        """``fetch``: the current tokens, in one round trip unless a recovery comes first.

        Fresh random tokens (a guaranteed miss) instead while Redis is down or was until
        lately (see :class:`OutageLedger`), when the pool had no connection for this call,
        and while a recovery of due intents runs in this store or has left some due: the
        tokens Redis holds then may be about to be replaced.
        """
        if self.outage.skip():
            return _fresh(identifiers)
        replay = self.outage.replay()
        claim = self._claim()
        try:
            results = yield [*claim, *self.calls.fetch(identifiers, replay)]
        except RedisError as error:
            self._failed(error, "fetch tokens")
            return _fresh(identifiers)
        self.outage.succeeded(replay)
        if claim:
            claimed = self._claimed(results[0])
            if claimed:
                # Fetched again behind the recovery's last bump: the tokens it replaced.
                after = yield from self._recover(claimed, self.calls.fetch(identifiers, ()))
                if after is None:
                    return _fresh(identifiers)
                results = after
        if self.outage.recovering() or self.recoveries.busy():
            return _fresh(identifiers)
        return self.calls.tokens(results, identifiers)

    def _intending(self, identifiers: Collection[str]) -> Exchange[str | None]:
        """``intend``: in durable mode, record the bumps a commit is about to make."""
        if not self.durable or not identifiers or self.outage.skip():
            return None
        intent = new_token()
        replay = self.outage.replay()
        try:
            yield [*self.calls.bump(replay), *self.calls.intend(intent, identifiers)]
        except RedisError as error:
            self._failed(error, "record the bumps a commit intends")
            return None
        self.outage.succeeded(replay)
        return intent

    def _bump_plan(self, identifiers: Collection[str]) -> tuple[Replay, Collection[str]] | None:
        """What a bump sends -- the kept bumps it replays, and everything to bump -- or
        ``None`` if it sends nothing: nothing to bump, or Redis is known to be down (then
        the bump is kept for the replay)."""
        if self.outage.skip():
            self.outage.keep(identifiers)
            self._replay_soon()
            return None
        replay = self.outage.replay()
        todo = replay.union(identifiers) if replay else identifiers
        return (replay, todo) if todo else None

    def _bumping(
        self,
        identifiers: Collection[str],
        intents: Collection[str],
        replay: Replay,
        todo: Collection[str],
    ) -> Exchange[None]:
        """``bump``, as planned by :meth:`_bump_plan`; clears ``intents`` with it."""
        claim = self._claim()
        try:
            results = yield [*claim, *self.calls.bump(todo, intents)]
        except RedisError as error:
            self.outage.keep(identifiers)
            self._replay_soon()
            self._failed(error, f"bump {len(todo)} token(s)")
            return
        self.outage.succeeded(replay)
        if claim:
            claimed = self._claimed(results[0])
            if claimed:
                yield from self._recover(claimed, [])

    def _claim(self) -> list[_Call]:
        """A claim of the due intents, to send in front of this call: in durable mode, at
        most once per half lease (so a crashed writer's bump is at most 1.5 leases late
        while the application makes calls), else never -- except that after a recovery
        that left intents due, the next call claims at once."""
        if not self.durable:
            return []
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + self.lease / 2
        return [self.calls.claim(self.lease)]

    def _claimed(self, result: list[Any]) -> dict[str, list[str]]:
        """The intents a claim took over (rarely any: a writer died)."""
        claimed = ScriptCalls.claimed(result)
        if not claimed:
            self.recoveries.none_due()
        return claimed

    def _recover(
        self, claimed: dict[str, list[str]], then: list[_Call]
    ) -> Exchange[list[Any] | None]:
        """Bump the intents a claim took over and clear them; while the claims come back
        full, claim and bump the next batch, for up to :data:`RECOVERY_BUDGET` seconds.

        One round trip per batch, each carrying the bump of one batch, the claim of the
        next, and ``then`` (a fetch's calls): in a loop, so that a backlog of any size
        costs a bounded stack, and at most the budget plus one round trip per call -- the
        next calls claim at once and go on (see :meth:`_claim`). Returns the results of
        the last round trip, whose ``then`` ran after the recovery's last bump with
        nothing more due, or ``None`` if intents may remain due (the budget ran out, or
        Redis failed): ``then``'s tokens could be about to be replaced.
        """
        deadline = time.monotonic() + RECOVERY_BUDGET
        self.recoveries.began(len(claimed))
        more_due = True
        try:
            while True:
                identifiers: set[str] = set().union(*claimed.values())
                more_due = len(claimed) >= CLAIM_LIMIT
                again = more_due and time.monotonic() < deadline
                calls = self.calls.bump(identifiers, claimed.keys())
                if again:
                    calls.append(self.calls.claim(self.lease))
                try:
                    results = yield [*calls, *then] if again or not more_due else calls
                except RedisError as error:
                    self.outage.keep(identifiers)
                    self._replay_soon()
                    self._failed(error, f"bump {len(identifiers)} token(s)")
                    return None
                self.outage.succeeded(_NOTHING)
                self.recoveries.applied(len(claimed))
                if not again:
                    return None if more_due else results
                claimed = ScriptCalls.claimed(results[len(calls) - 1])
                if not claimed:
                    more_due = False
                    return results
        finally:
            if more_due:
                self._next_claim = 0.0  # the next call claims at once
            self.recoveries.ended(more_due)

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
    would group keys by hash slot and send one such call per slot in one pipeline per
    node, behind the same :class:`TokenStore` protocol.

    With ``on_error="degrade"`` (the default), a Redis error never reaches the caller:

    * ``fetch`` returns fresh random tokens, so the key is a guaranteed cache miss;
    * ``bump`` keeps the identifiers (up to ``max_pending``) and sends them again in front
      of the next ``fetch`` or ``bump`` of this store, in the same round trip. A key this
      process generates after Redis recovers therefore never reuses a token from before
      a write that committed during the outage.

    Each outage is logged once when it starts and once when it ends, on the
    ``alkey.tokens`` logger, with counts (see :class:`OutageLedger`).

    A connection pool with no free connection (``max_connections``) is no outage: the
    call waits for one, at most the client's socket timeout (:meth:`ScriptStore.waits`),
    and only if none comes does that call alone go without Redis, as above, marking
    nothing down (:meth:`OutageLedger.exhausted`).

    ``durable=True`` closes the one gap memory cannot: a process that dies (or loses
    Redis for good) between the database COMMIT and the bump. Just before the COMMIT the
    listeners call :meth:`intend`, which records the identifiers about to be bumped under
    a random intent id, stamped with Redis's clock (one more round trip per writing
    commit); the bump clears the intent in its own round trip. Any process using a
    durable store claims the intents older than ``lease`` seconds, at most once per half
    lease, in the pipeline of a call it makes anyway, and bumps them. A key therefore
    never outlives a committed write by more than about 1.5 leases while some process
    generates keys or commits. Read-only commits still cost nothing. A backlog of due
    intents (many writers died) is drained in batches, one round trip each, for at most
    :data:`RECOVERY_BUDGET` seconds per call, the next calls going on at once; meanwhile
    fetches miss (see :meth:`ScriptStore._recover`).

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
        durable: bool = False,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        super().__init__(
            ttl=ttl,
            key_prefix=key_prefix,
            on_error=on_error,
            max_pending=max_pending,
            retry_interval=retry_interval,
            durable=durable,
            lease=lease,
        )
        self.client = client
        timeout = checked_socket_timeout(client.connection_pool)
        self.outage.recovery_window += timeout
        self.pool_wait = timeout or POOL_WAIT
        self._replayer: threading.Thread | None = None
        self._replayer_lock = threading.Lock()
        self._replays_at_exit = False
        self._share_through(client.connection_pool)

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        if not identifiers:
            return []
        return self._exchange(self._fetching(identifiers))

    def intend(self, identifiers: Collection[str]) -> str | None:
        """In durable mode, record in Redis that ``identifiers`` are about to be bumped
        (one round trip, just before the database COMMIT); return the intent's id for
        :meth:`bump`. Without durable mode, or while Redis is down: ``None``."""
        return self._exchange(self._intending(identifiers))

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        self._bump(identifiers, () if intent is None else (intent,))

    def _bump(self, identifiers: Collection[str], intents: Collection[str]) -> None:
        plan = self._bump_plan(identifiers)
        if plan is not None:
            self._exchange(self._bumping(identifiers, intents, *plan))

    def _exchange(self, exchange: Exchange[_R]) -> _R:
        """Carry out one of :class:`ScriptStore`'s calls: send each round trip it yields,
        hand it back the results or the error."""
        try:
            calls = next(exchange)
            while True:
                try:
                    results = self._run(calls)
                except RedisError as error:
                    calls = exchange.throw(error)
                else:
                    calls = exchange.send(results)
        except StopIteration as done:
            answer: _R = done.value
            return answer
        finally:
            exchange.close()

    def _replay_soon(self) -> None:
        """Replay the kept bumps from a daemon thread, probing every ``retry_interval``,
        instead of waiting for this process's next call: other processes must not go on
        using the old tokens because this one fell idle after the outage."""
        with self._replayer_lock:
            if self._replayer is not None and self._replayer.is_alive():
                return
            self._replayer = threading.Thread(
                target=self._replay_until_done, name="alkey-replay", daemon=True
            )
            self._replayer.start()
            if not self._replays_at_exit:
                self._replays_at_exit = True
                atexit.register(_replay_at_exit, weakref.ref(self))

    def _replay_until_done(self) -> None:
        while True:
            # Deciding to stop and saying so happen under the lock that _replay_soon
            # takes after keeping a bump: a bump kept meanwhile either keeps this thread
            # going or starts the next one, never neither.
            with self._replayer_lock:
                if not self.outage.pending:
                    self._replayer = None
                    return
            time.sleep(max(self.outage.retry_interval, 0.01))
            self._replay_now()

    def _replay_now(self) -> None:
        # on_error="raise": nobody to raise to here; the next round retries.
        with contextlib.suppress(RedisError):
            self._bump((), ())

    def wait_replayed(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the bumps kept during an outage to reach
        Redis; whether none is left. For a graceful shutdown, or a test. (A process that
        exits normally also tries once more by itself, from an ``atexit`` hook.)"""
        replayer = self._replayer
        if replayer is not None:
            replayer.join(timeout)
        return not self.outage.pending

    def _run(self, calls: list[_Call]) -> list[Any]:
        """Send the script calls in one round trip, waiting for a connection if the pool
        has none free (see :meth:`ScriptStore.waits`)."""
        waits: Iterator[float] | None = None
        while True:
            try:
                return self._run_once(calls)
            except MaxConnectionsError:
                waits = self.waits() if waits is None else waits
                pause = next(waits, None)
                if pause is None:
                    raise
                time.sleep(pause)

    def _run_once(self, calls: list[_Call]) -> list[Any]:
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


def _connection_option(pool: Any, name: str) -> Any:
    """A connection option of ``pool``: its own setting, else the connection class's
    default (redis-py 8 gives connections a 5 s socket timeout; earlier versions none)."""
    options = getattr(pool, "connection_kwargs", {})
    if name in options:
        return options[name]
    for cls in getattr(getattr(pool, "connection_class", None), "__mro__", ()):
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            parameter = inspect.signature(init).parameters.get(name)
        except (TypeError, ValueError):  # pragma: no cover - a C-level __init__
            continue
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    return None


def checked_socket_timeout(pool: Any) -> float:
    """The socket timeout of a pool's connections (0 if none), for a store's recovery
    window; first, a warning if the pool lets one call wait for an unanswering Redis
    without bound or many times over.

    A store answers at once only *after* a failure (``retry_interval``); the call that meets
    the outage first waits as long as the client lets it -- inside a commit, after the
    COMMIT, or, in durable mode, before it, with the transaction's locks held. alkey's
    default client waits 2 s, once. Before redis-py 8 a client built by hand has no socket
    timeout (a hung Redis then blocks it for good), and ``redis.Redis(host=...)`` retries
    10 times under redis-py 8; both are worth a warning, once per store.
    """
    timeout = _connection_option(pool, "socket_timeout")
    retry = _connection_option(pool, "retry")
    retries = retry.get_retries() if hasattr(retry, "get_retries") else 0
    problems = []
    if not isinstance(timeout, int | float):
        problems.append("no socket_timeout (a hung Redis would block it for good)")
    if retries:
        count = "unlimited" if retries < 0 else str(retries)
        problems.append(f"{count} retries (each multiplies the wait)")
    if problems:
        log.warning(
            "alkey's Redis client has %s: the first call to meet a Redis outage waits for "
            "it, even inside a commit. Build it with socket_timeout=2 and no retries "
            "(redis.Redis.from_url(url, socket_timeout=2), or retry=Retry(NoBackoff(), 0)), "
            "as alkey's default client is.",
            " and ".join(problems),
        )
    return float(timeout) if isinstance(timeout, int | float) else 0.0


def _replay_at_exit(store: weakref.ref[RedisTokenStore]) -> None:
    live = store()
    if live is None or not live.outage.pending:
        return
    # There is no later call to wait for: probe now, even within retry_interval of the
    # last failure (a job that exits right after Redis came back must not lose its bumps).
    live.outage.probe_now()
    # Best effort at interpreter exit: a failure must not print a traceback (starting the
    # background replay, for one, is refused this late).
    with contextlib.suppress(Exception):
        live._replay_now()


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
