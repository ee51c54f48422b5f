"""The local token cache: tokens this process fetched lately, kept until Redis says they
changed.

Why: a token changes only when a row is written, and most rows are read far more often
than written, so almost every fetch returns what the process fetched last time. With the
cache on (``local_cache=<entries>``), a key whose tokens are all cached costs no round trip
at all. What makes that safe is Redis's server-assisted client-side caching (``CLIENT
TRACKING``): a listener (:mod:`alkey.invalidations`) keeps one connection per Redis on
which the server announces every change of a token key, and evicts it here.

This module is the cache alone -- no I/O, no client library -- shared by the sync and
asyncio stores (:class:`~alkey.tokens.ScriptStore`) and fed by either listener. Its rules:

* **Nothing is served unless Redis was heard lately.** The listener pings Redis every
  :data:`PING_EVERY` seconds on the tracking connection; when it reads the answer to a
  ping sent at time *t*, every invalidation Redis sent before *t* has been read too (one
  connection keeps its order), so the cache is current as of *t*. A lookup finds nothing
  once that time is more than :data:`LEASE` seconds old, so a tracking connection that
  dies silently (a network partition, a hung Redis, a stalled listener) stops the hits
  within that bound, before anyone notices the failure -- and a listener that resumes
  serves again only once it has read a pong sent after it resumed.
* **An invalidation that races a fetch wins.** Each cold fetch is registered before its
  round trip goes out (:meth:`LocalTokens.begin`); an invalidation or a flush that
  arrives while it is in flight spoils what it names, and :meth:`LocalTokens.fill`
  keeps only what was not spoiled. A listener that reconnected meanwhile (a new
  *generation*) spoils everything: invalidations may have been lost in between.
* **Any doubt empties it.** A lost or reconnected tracking connection, a ``FLUSHALL``
  (Redis sends an invalidation of everything), a change of the server's replication id
  (a failover or a restart, seen by a cold fetch), a fork, or any listener error clears
  every entry before the next lookup.
* **A process reads its own writes.** The store evicts what it bumps as soon as the bump
  returns (:meth:`LocalTokens.evict`), without waiting for Redis's message.

What a reader in *another* process can still see is the old token until Redis's
invalidation reaches it: the benchmark measures that delay (README, "Local token
cache").
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["LEASE", "PING_EVERY", "CacheStats", "LocalTokens"]

log = logging.getLogger("alkey.localcache")

#: Seconds after which the cache serves nothing unless a ping sent since on the tracking
#: connection was answered: the bound on a hit's staleness when that connection, Redis or
#: the listener fails silently.
LEASE = 1.0
#: Seconds between the listener's pings on the tracking connection (one at a time).
PING_EVERY = 0.25


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a local token cache, for metrics and ``repr``.

    Counts are of identifiers and run from the cache's creation.
    """

    #: Tokens held now.
    entries: int
    #: The most tokens it holds; the least recently used go first.
    max_entries: int
    #: Identifiers answered from the cache, with no round trip.
    hits: int
    #: Identifiers that had to be fetched from Redis.
    misses: int
    #: Cached tokens evicted because Redis said they changed, or this process bumped them.
    invalidations: int
    #: Times the whole cache was emptied (see the module for why).
    flushes: int
    #: Whether lookups are served now (the tracking connection is up and was heard lately).
    live: bool
    #: Bytes the entries take, estimated with :func:`sys.getsizeof`.
    memory: int


class CacheEvents(Protocol):
    """Who hears of a cache's invalidations and flushes (a store's observers)."""

    #: The observers' ``local_invalidated`` methods: empty when nobody listens, so that
    #: an invalidation costs no event.
    local_invalidated_hooks: tuple[Any, ...]

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        """Token keys changed, and those the cache held were evicted
        (:meth:`alkey.observers.StoreObserver.local_invalidated`)."""

    def local_flushed(self, *, reason: str, entries: int) -> None:
        """The cache was emptied (:meth:`alkey.observers.StoreObserver.local_flushed`)."""


def _epoch(token: str) -> str:
    """The epoch folded into a fetched token (``<token>@<epoch>``)."""
    return token[token.rfind("@") + 1 :]


class _Fetch:
    """One cold fetch in flight: what an invalidation arriving meanwhile spoils."""

    __slots__ = ("everything", "generation", "spoiled")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.spoiled: set[str] | None = None  # made when an invalidation names something
        self.everything = False


# Every cache of the process, emptied in a forked child: its listener did not survive
# the fork, and invalidations would no longer reach it.
_caches: weakref.WeakSet[LocalTokens] = weakref.WeakSet()


def _after_fork() -> None:
    for cache in list(_caches):
        cache._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class LocalTokens:
    """A bounded, least-recently-used map of identifier to token, safe to share between
    threads and tasks, that serves lookups only while its listener proves it current.

    ``max_entries`` bounds it; ``key_prefix`` is the store's (the listener hears Redis
    key names, which carry it). ``events`` hears of invalidations and flushes (the
    store's observers).
    """

    def __init__(
        self, max_entries: int, key_prefix: str = "", events: CacheEvents | None = None
    ) -> None:
        self.max_entries = max_entries
        self.key_prefix = key_prefix
        self._events = events
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()
        self._fetches: set[_Fetch] = set()
        # The servers whose listeners must all be up for the cache to serve (one, None,
        # for a single Redis; a cluster's primaries by name), those that are up with
        # when each was last heard, and the epoch (replication id, as folded into tokens)
        # of each: a token is kept only if the server it came from is listened to.
        self._expected: frozenset[Hashable] = frozenset({None})
        self._heard_at: dict[Hashable, float] = {}
        self._epochs: dict[Hashable, str] = {}
        self._heard_epochs: frozenset[str] = frozenset()
        # A generation while every expected listener is up, None otherwise; and the
        # oldest time one of them was last heard.
        self._generation = 0
        self._live: int | None = None
        self._heard = 0.0
        #: Set when a cold fetch was answered by a server no listener hears (a failover,
        #: a restart): the listeners reconnect, and learn the servers anew.
        self.reconnect = False
        self._closed = False
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self.flushes = 0
        _caches.add(self)

    # -- the store's side --------------------------------------------------------------

    def lookup(self, identifiers: Sequence[str]) -> list[str | None] | None:
        """The cached token of each identifier (``None`` where none), or ``None`` if the
        cache cannot serve now (a listener is not up, or one has not heard Redis within
        :data:`LEASE` seconds)."""
        if self._live is None or time.monotonic() - self._heard > LEASE:
            return None
        with self._lock:
            entries = self._entries
            found: list[str | None] = list(map(entries.get, identifiers))
            misses = found.count(None)
            if misses != len(found):
                move = entries.move_to_end
                for identifier, token in zip(identifiers, found, strict=True):
                    if token is not None:
                        move(identifier)
            self.hits += len(found) - misses
            self.misses += misses
        return found

    def begin(self) -> _Fetch | None:
        """Register a cold fetch about to go out, or ``None`` if what it brings back cannot
        be kept (a listener is not up: invalidations would not reach the cache)."""
        generation = self._live
        if generation is None:
            return None
        fetch = _Fetch(generation)
        with self._lock:
            self._fetches.add(fetch)
        return fetch

    def fill(
        self,
        fetch: _Fetch | None,
        identifiers: Sequence[str],
        tokens: Sequence[str],
        *,
        one_server: bool = True,
    ) -> None:
        """Keep what ``fetch`` brought back -- except what an invalidation spoiled while it
        was in flight, everything if a listener reconnected meanwhile, and any token
        whose epoch (``<token>@<epoch>``) is not that of a server a listener hears: that
        token came from a server no listener hears (a failover, a restart, a node added
        to a cluster), which empties the cache and reconnects the listeners.
        ``one_server``: all the tokens came from one server (not a cluster), so the
        epoch of the first is that of all."""
        if fetch is None:
            return
        flushed = -1
        with self._lock:
            self._fetches.discard(fetch)
            if not tokens:
                return
            if fetch.everything or fetch.generation != self._live:
                return
            heard = self._heard_epochs
            if one_server:
                foreign = _epoch(tokens[0]) not in heard
            else:
                foreign = any(_epoch(token) not in heard for token in tokens)
            if foreign:
                flushed = self._clear_locked()
                self.reconnect = True
                self._live = None
            else:
                # The identifiers a cold fetch asks for are those the cache lacked, so
                # they go in as the most recently used, in one step.
                entries = self._entries
                spoiled = fetch.spoiled
                if spoiled:
                    entries.update(
                        (identifier, token)
                        for identifier, token in zip(identifiers, tokens, strict=True)
                        if identifier not in spoiled
                    )
                else:
                    entries.update(zip(identifiers, tokens, strict=True))
                for _ in range(len(entries) - self.max_entries):
                    entries.popitem(last=False)
        if flushed >= 0:
            self._flushed("a fetch was answered by a server no listener hears", flushed)

    def abandon(self, fetch: _Fetch | None) -> None:
        """Forget a fetch that ended without tokens to keep (an error, a forced miss)."""
        if fetch is not None:
            with self._lock:
                self._fetches.discard(fetch)

    def evict(self, identifiers: Collection[str]) -> None:
        """Drop ``identifiers`` (this process bumped them), and spoil them in every fetch
        in flight: read-your-writes within the process, before Redis's message comes."""
        self._invalidate(identifiers)

    # -- the listeners' side -----------------------------------------------------------

    def expect(self, sources: Collection[Hashable]) -> None:
        """Serve only while a listener is up for each of ``sources`` (a cluster's
        primaries, by name); a change empties the cache."""
        wanted = frozenset(sources)
        with self._lock:
            if wanted == self._expected:
                if self._live is None:
                    self._new_generation()  # serving again if every listener is up
                return
            self._expected = wanted
            for gone in set(self._heard_at) - wanted:
                del self._heard_at[gone]
                self._epochs.pop(gone, None)
            flushed = self._clear_locked()
            self._new_generation()
        self._flushed("the servers to listen to changed", flushed)

    def wanted(self, source: Hashable) -> bool:
        """Whether a listener for ``source`` should go on (else it ends)."""
        return not self._closed and source in self._expected

    def connected(self, source: Hashable = None, epoch: str = "") -> int:
        """The listener of ``source`` is up and subscribed, on a server whose epoch is
        ``epoch``: a new generation (fetches that went out before it keep nothing),
        serving once every expected listener is up."""
        with self._lock:
            if source not in self._expected:
                return self._generation  # a listener no longer wanted: it ends
            flushed = self._clear_locked()
            self._heard_at[source] = time.monotonic()
            self._epochs[source] = epoch
            self.reconnect = False
            generation = self._new_generation()
        self._flushed("a tracking connection is new", flushed)
        return generation

    def heard(self, source: Hashable = None, since: float | None = None) -> bool:
        """Redis answered a ``PING`` that ``source``'s listener sent at ``since`` (a
        :func:`time.monotonic` time; default now): one connection keeps its order, so
        every invalidation Redis sent before that moment has been read. Only a pong
        proves this: an invalidation message read now may have been sent long ago, by a
        listener that stalled. ``False`` if ``source`` is not up as far as the cache knows
        (dropped from the servers to listen to, and listed again): its listener must
        connect again."""
        at = time.monotonic() if since is None else since
        with self._lock:
            heard_at = self._heard_at
            if source not in heard_at:
                return False
            if at > heard_at[source]:
                heard_at[source] = at
                self._heard = min(heard_at.values())
            return True

    def invalidated(self, keys: Sequence[bytes | str] | None, source: Hashable = None) -> None:
        """Redis's invalidation message: these Redis keys changed (``None``: everything,
        after a ``FLUSHALL`` or ``FLUSHDB``)."""
        if keys is None:
            self.flush("Redis flushed its data")
            return
        prefix = len(self.key_prefix)
        names = [
            (key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key)[prefix:]
            for key in keys
        ]
        self._invalidate(names)

    def lost(self, reason: str, source: Hashable = None) -> None:
        """``source``'s tracking connection is gone: serve nothing until it is back."""
        with self._lock:
            self._heard_at.pop(source, None)
            self._epochs.pop(source, None)
            if source not in self._expected:
                return  # a listener no longer wanted: the others serve on
            self._live = None
            flushed = self._clear_locked()
        self._flushed(f"a tracking connection was lost: {reason}", flushed)

    def flush(self, reason: str) -> None:
        """Empty the cache and spoil every fetch in flight."""
        with self._lock:
            flushed = self._clear_locked()
        self._flushed(reason, flushed)

    def close(self) -> None:
        """Stop serving for good, and let the listeners end."""
        self._closed = True
        with self._lock:
            self._heard_at.clear()
            self._epochs.clear()
            self._live = None
            flushed = self._clear_locked()
        self._flushed("the cache was closed", flushed)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called: the listeners end."""
        return self._closed

    @property
    def live(self) -> bool:
        """Whether lookups are served now."""
        return self._live is not None and time.monotonic() - self._heard <= LEASE

    def stats(self) -> CacheStats:
        """Counts, size and estimated memory (walks every entry: not for the hot path)."""
        with self._lock:
            items = list(self._entries.items())
            memory = sys.getsizeof(self._entries) + sum(
                sys.getsizeof(key) + sys.getsizeof(token) for key, token in items
            )
        return CacheStats(
            entries=len(items),
            max_entries=self.max_entries,
            hits=self.hits,
            misses=self.misses,
            invalidations=self.invalidations,
            flushes=self.flushes,
            live=self.live,
            memory=memory,
        )

    def __repr__(self) -> str:
        stats = self.stats()
        return (
            f"<LocalTokens {stats.entries}/{stats.max_entries} entries, "
            f"{'live' if stats.live else 'not serving'}, {stats.hits} hits, "
            f"{stats.misses} misses>"
        )

    # -- inside ------------------------------------------------------------------------

    def _invalidate(self, names: Collection[str]) -> None:
        with self._lock:
            pop = self._entries.pop
            dropped = 0
            for name in names:
                if pop(name, None) is not None:
                    dropped += 1
            self.invalidations += dropped
            for fetch in self._fetches:
                if fetch.spoiled is None:
                    fetch.spoiled = set(names)
                else:
                    fetch.spoiled.update(names)
        events = self._events
        if events is not None and events.local_invalidated_hooks:
            events.local_invalidated(count=len(names), evicted=dropped)

    def _new_generation(self) -> int:
        """Start a generation (the lock held); serving if every expected listener is up."""
        self._heard_epochs = frozenset(self._epochs.values())
        self._generation += 1
        heard_at = self._heard_at
        if self._expected and self._expected.issubset(heard_at) and not self._closed:
            self._live = self._generation
            self._heard = min(heard_at[source] for source in self._expected)
        else:
            self._live = None
        return self._generation

    def _clear_locked(self) -> int:
        """Empty the cache (the lock held); how many tokens it held."""
        held = len(self._entries)
        if held:
            self.flushes += 1
        self._entries.clear()
        for fetch in self._fetches:
            fetch.everything = True
        return held

    def _flushed(self, reason: str, entries: int) -> None:
        if entries <= 0:
            return
        log.debug("alkey's local token cache emptied of %d token(s): %s", entries, reason)
        if self._events is not None:
            self._events.local_flushed(reason=reason, entries=entries)

    def _forked(self) -> None:
        # In the child: no listener any more, and the lock may be held by a thread that
        # did not survive the fork.
        self._lock = threading.Lock()
        self._live = None
        self._heard_at.clear()
        self._epochs.clear()
        self._entries.clear()
        self._fetches.clear()
