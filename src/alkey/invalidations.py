"""The listeners that keep a local token cache current: Redis's invalidation messages.

Why ``BCAST`` mode on a connection of its own: alkey's fetch is a Lua script, and what a
script reads is tracked differently across Redis versions (redis-py's own client-side
cache does not track it at all). In broadcasting mode the server announces a change of
*any* key under a prefix -- here ``<key_prefix>alkey:`` -- to the tracking connection,
whoever wrote it and whatever read it. So the store's own connections and round trips
stay exactly as they are (a cold fetch costs what it cost before), and a token is
announced whether it was read by a script, a ``MGET`` or not at all. The cost is on the
server and the network: every bump is announced to every process with the cache on,
batched by Redis per event-loop cycle (one message for the keys of a bump), rather than
only to the processes that read the key (default mode, which instead keeps a table of
every key each client read, in the server's memory, and spuriously invalidates past
``tracking-table-max-keys``). Token writes are rare next to token reads, which is the
premise of the cache; the benchmark measures both modes' server cost (README, "Local
token cache").

The connection speaks RESP2 whatever the application's client speaks, redirects its own
tracking to itself (``CLIENT TRACKING ON REDIRECT <own id> BCAST PREFIX ...``) and
subscribes to ``__redis__:invalidate``; it is made with the application's connection
options (TLS, password, Sentinel), outside its pool, so it never takes a connection the
application counts on -- with bounded timeouts and without redis-py's health checks,
which would read (and lose) an invalidation in place of their answer.

Why a second connection, the *probe*: a subscribed RESP2 connection can only ``PING``,
and a ping proves the server answers, not that it is still the primary the tokens are
written to. A server that became a replica (a failover that left the old primary
running, a cluster node cut off from its cluster) answers pings while the writes go
elsewhere. So each listener also holds a plain connection to the same server, and with
every ping asks it ``INFO replication`` (and ``CLUSTER INFO`` on a cluster): the server
must still be a primary, of the same replication id as when the listener subscribed
(and its cluster's state ``ok``). The listener refuses a replica from the start, as the
fetch script does.

Every :data:`~alkey.localcache.PING_EVERY` seconds the listener notes the time, pings on
the tracking connection and checks the probe; the answer to that ping tells the cache it
is current as of the noted time (:meth:`~alkey.localcache.LocalTokens.heard`), and the
cache serves nothing once that is more than :data:`~alkey.localcache.LEASE` seconds ago.
Any error, an unexpected reply, a failed check or a failover seen by a fetch drops both
connections and empties the cache; the listener connects again every ``retry_interval``
seconds. Each loss is logged once, when it begins, and once when the listener is back.

The sync store's listener is a daemon thread; the asyncio store's is a task on the loop
that made the first fetch. Both hold the cache weakly, and what they connect with holds
neither the store nor its pool: they end once the cache is closed or garbage collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Generator, Hashable
from typing import Any, TypeAlias, TypeVar

from alkey.errors import redacted
from alkey.localcache import LEASE, PING_EVERY, LocalTokens
from alkey.scripts import EPOCH_LENGTH

__all__ = ["AsyncListener", "ClusterListeners", "Listener", "epoch_of", "tracking_commands"]

log = logging.getLogger("alkey.localcache")

#: The channel Redis publishes invalidations on, for a RESP2 redirect.
CHANNEL = "__redis__:invalidate"


#: Seconds a tracking or probe connection waits for an answer (and to connect, when the
#: client sets no bound): a listener blocked for ever would leave the cache off for ever.
TRACKING_TIMEOUT = 2.0


#: Connection options that refer back to the client or its pool (a cluster client's
#: connect hook; redis-py's maintenance-notification handlers, whatever their names).
_BACK_REFERENCES = frozenset({"redis_connect_func"})


def _refers_back(name: str) -> bool:
    return name in _BACK_REFERENCES or name.endswith("_handler")


def tracking_options(options: dict[str, Any]) -> dict[str, Any]:
    """A client's connection options as the listener's connections use them: RESP2,
    redis-py's health checks off (they would read an invalidation as their answer), and
    a read timeout of :data:`TRACKING_TIMEOUT` (the few small commands they send never
    need more, and a stalled probe must not hold a reconnection up for long)."""
    # Left out: what refers back to the client or its pool (a cluster client's connect
    # hook, redis-py's maintenance-notification handlers), which would keep them -- and
    # the store they hold -- alive as long as the listener runs.
    # And redis-py 8's maintenance notifications, which need RESP3 or hiredis: on a RESP2
    # connection without hiredis, redis-py refuses to connect while they are configured.
    kept = {
        name: value
        for name, value in options.items()
        if not _refers_back(name) and name != "maint_notifications_config"
    }
    return {
        **kept,
        "protocol": 2,
        "health_check_interval": 0,
        "socket_timeout": TRACKING_TIMEOUT,
        "socket_connect_timeout": options.get("socket_connect_timeout") or TRACKING_TIMEOUT,
    }


def marked(connection: Any) -> Any:
    """``connection``, marked as a tracking connection (``_alkey_tracking``): its pings
    are the cache's upkeep, not a call's round trip, and :class:`alkey.testing.RoundTrips`
    does not count them."""
    connection._alkey_tracking = True
    return connection


def tracking_commands(client_id: int, key_prefix: str) -> list[tuple[str, ...]]:
    """The commands that turn a fresh connection (whose id is ``client_id``) into a
    tracking connection for the token keys under ``key_prefix``."""
    return [
        (
            "CLIENT",
            "TRACKING",
            "ON",
            "REDIRECT",
            str(client_id),
            "BCAST",
            "PREFIX",
            f"{key_prefix}alkey:",
        ),
        ("SUBSCRIBE", CHANNEL),
    ]


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def _read(cache: LocalTokens, reply: Any, source: Hashable) -> None:
    """Act on one reply on ``source``'s tracking connection: an invalidation, or a pong."""
    if not isinstance(reply, list) or not reply:
        raise _UnexpectedReplyError(reply)
    kind = _text(reply[0])
    if kind == "message" and len(reply) == 3 and _text(reply[1]) == CHANNEL:
        keys = reply[2]
        cache.invalidated(None if keys is None else list(keys), source)
    elif kind == "subscribe":
        pass  # the confirmation of the subscription, read at connect
    else:
        raise _UnexpectedReplyError(reply)


def _refused(error: Exception) -> str:
    """``""`` for an error answer of the server (``INFO`` refused by an ACL without
    ``+info``: the fetch script then reads no epoch either, and the two agree); any
    other error (the connection failed) is raised again."""
    if any(kind.__name__ == "ResponseError" for kind in type(error).__mro__):
        return ""
    raise error


def epoch_of(info: Any) -> str:
    """The epoch of a server, as folded into its tokens, from its ``INFO replication``
    (empty if the server hides its replication id, as the fetch script reads it)."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    found = re.search(r"master_replid:([0-9a-fA-F]+)", text)
    return found.group(1)[:EPOCH_LENGTH] if found else ""


def primary_epoch(info: Any) -> str:
    """:func:`epoch_of` a server that must be a primary; raises if it is a replica (its
    tokens may lag the primary's bumps, and so may the invalidations it sends)."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    if "role:slave" in text or "role:replica" in text:
        raise ConnectionError("the tracking connection reached a replica, not the primary")
    return epoch_of(text)


def checked(epoch: str, info: Any, cluster_info: Any = None) -> None:
    """The probe's answers: the server must still be the primary it was when the listener
    subscribed (same epoch), and, on a cluster, its cluster's state ``ok``."""
    now = primary_epoch(info)
    if now != epoch:
        raise ConnectionError(
            f"the tracked server's replication id changed ({epoch or '?'} -> {now or '?'}): "
            "a failover or a restart"
        )
    if cluster_info is not None:
        text = _text(cluster_info)
        if text and "cluster_state:ok" not in text:
            raise ConnectionError("the tracked node's cluster is not ok (cluster_state)")


class _Pings:
    """A listener's pings: one every :data:`PING_EVERY` seconds, one at a time; the
    answer to one sent at *t* tells the cache it is current as of *t*
    (:meth:`LocalTokens.heard`). A ping unanswered for :data:`LEASE` seconds fails the
    connection."""

    def __init__(self) -> None:
        self._next = time.monotonic() + PING_EVERY
        self._out: float | None = None

    def due(self) -> bool:
        return self._out is None and time.monotonic() >= self._next

    def sent(self, at: float) -> None:
        """A ping went out; ``at``: the time noted just before it was sent."""
        self._out = at

    def wait(self) -> float:
        """Seconds to wait for a reply before the next ping is due, or the one out is late."""
        now = time.monotonic()
        if self._out is None:
            return max(self._next - now, 0.0)
        late = self._out + LEASE - now
        if late <= 0:
            raise TimeoutError(f"Redis did not answer a PING within {LEASE} s")
        return min(late, PING_EVERY)

    def read(self, cache: LocalTokens, reply: Any, source: Hashable) -> None:
        """Act on one reply; a pong answers the ping out."""
        if _is_pong(reply):
            if self._out is None:
                raise _UnexpectedReplyError(reply)
            if not cache.heard(source, self._out):
                raise ConnectionError("this listener's server was dropped and listed again")
            self._next = self._out + PING_EVERY
            self._out = None
        else:
            _read(cache, reply, source)


def _is_pong(reply: Any) -> bool:
    return isinstance(reply, list) and bool(reply) and _text(reply[0]) == "pong"


class _UnexpectedReplyError(Exception):
    def __init__(self, reply: Any) -> None:
        super().__init__(f"unexpected reply on the tracking connection: {reply!r:.200}")


class _Incidents:
    """Logs a loss of the tracking connection once when it begins and once when it ends."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.down_since: float | None = None

    def lost(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "alkey's local token cache is off: its tracking connection to %s failed "
                "(%s). Every key is fetched from Redis until it is back.",
                self.where,
                redacted(str(error)) or type(error).__name__,
            )

    def back(self) -> None:
        if self.down_since is not None:
            log.warning(
                "alkey's local token cache is on again: its tracking connection to %s is "
                "back after %.1f s.",
                self.where,
                time.monotonic() - self.down_since,
            )
            self.down_since = None


#: One exchange with the server, written once for both flavours of listener: a generator
#: that yields ``(connection, command)`` -- :data:`TRACKING` or :data:`PROBE`, and what to
#: send on it -- and is sent the reply, or thrown the error that came instead; it returns
#: what the exchange found out. :class:`Listener` and :class:`AsyncListener` only differ
#: in how they wait for the replies, as the stores do (:data:`alkey.tokens.Exchange`).
Talk: TypeAlias = "Generator[tuple[int, tuple[str, ...]], Any, _T]"
#: Which of a listener's two connections a command goes to.
TRACKING, PROBE = 0, 1

_T = TypeVar("_T")


class _Listening:
    """What a listener of either flavour is: the server it listens to, how it connects,
    how it reports its incidents, and what it says to the server (its ``Talk``).

    ``connect`` makes a new, connected RESP2 connection (awaited for an asyncio
    listener) to the server to listen to, each time it is called; ``where`` names the
    server in log lines; ``source`` is the server's name for the cache (``None`` for a
    single Redis); ``clustered``: the server is a cluster node (the probe checks its
    cluster's state).
    """

    def __init__(
        self,
        cache: LocalTokens,
        connect: Callable[[], Any],
        *,
        retry_interval: float,
        where: str,
        source: Hashable = None,
        clustered: bool = False,
    ) -> None:
        self._cache = weakref.ref(cache)
        self._key_prefix = cache.key_prefix
        self._connect = connect
        self._retry_interval = max(retry_interval, 0.05)
        self._incidents = _Incidents(where)
        self._source = source
        self._clustered = clustered

    def _subscribing(self, cache: LocalTokens) -> Talk[str]:
        """Turn the tracking connection into one (a replica refused), check the server
        with the probe, and return its epoch."""
        try:
            info = yield TRACKING, ("INFO", "replication")
        except Exception as error:
            info = _refused(error)
        epoch = primary_epoch(info)
        client_id = int((yield TRACKING, ("CLIENT", "ID")))
        for command in tracking_commands(client_id, self._key_prefix):
            reply = yield TRACKING, command
        _read(cache, reply, self._source)  # the subscription's confirmation
        yield from self._probing(epoch)  # a failing cluster: not back yet
        return epoch

    def _probing(self, epoch: str) -> Talk[None]:
        """Check that the server is still the primary of ``epoch`` (and its cluster ok)."""
        answers: list[Any] = []
        commands = [("INFO", "replication")]
        if self._clustered:
            commands.append(("CLUSTER", "INFO"))
        for command in commands:
            try:
                answers.append((yield PROBE, command))
            except Exception as error:
                answers.append(_refused(error))
        if answers[0] != "":  # an ACL without +info: nothing to check, as for the fetch
            checked(epoch, answers[0], answers[1] if self._clustered else None)

    def _failed(self, error: Exception) -> bool:
        """A connection or a check failed: report it and empty the cache; whether to go
        on (not if the cache was closed or dropped meanwhile: no incident then)."""
        cache = self._cache()
        if cache is None or not cache.wanted(self._source):
            return False
        self._incidents.lost(error)
        cache.lost(str(error), self._source)
        return True


class Listener(_Listening):
    """The sync store's listener: a daemon thread holding the tracking and probe
    connections (redis-py ``Connection`` objects)."""

    def __init__(
        self,
        cache: LocalTokens,
        connect: Callable[[], Any],
        *,
        retry_interval: float,
        where: str,
        source: Hashable = None,
        clustered: bool = False,
    ) -> None:
        super().__init__(
            cache,
            connect,
            retry_interval=retry_interval,
            where=where,
            source=source,
            clustered=clustered,
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _after_fork_locks.add(self)

    def ensure_running(self) -> None:
        """Start the thread unless it runs (or the cache is closed)."""
        cache = self._cache()
        if cache is None or cache.closed:
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._run, name="alkey-invalidations", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            cache = self._cache()
            if cache is None or not cache.wanted(self._source):
                return
            connections: list[Any] = []
            try:
                connections.extend((self._connect(), self._connect()))
                epoch = self._talk(self._subscribing(cache), connections)
                cache.connected(self._source, epoch)
                self._incidents.back()
                cache = None  # held only between waits (see _serve)
                self._serve(connections, epoch)
            except Exception as error:
                cache = None
                if not self._failed(error):
                    return
                time.sleep(self._retry_interval)
            finally:
                for opened in connections:
                    with contextlib.suppress(Exception):
                        opened.disconnect()

    @staticmethod
    def _talk(talk: Talk[_T], connections: list[Any]) -> _T:
        """Carry out a :data:`Talk`, one command and its reply at a time."""
        try:
            which, command = next(talk)
            while True:
                connection = connections[which]
                connection.send_command(*command)
                try:
                    reply = connection.read_response()
                except Exception as error:
                    which, command = talk.throw(error)
                else:
                    which, command = talk.send(reply)
        except StopIteration as done:
            answer: _T = done.value
            return answer
        finally:
            talk.close()

    def _serve(self, connections: list[Any], epoch: str) -> None:
        """Read invalidations until the cache is gone, wants a reconnection, or a
        connection or a check fails (raises); ping and probe every :data:`PING_EVERY`."""
        connection = connections[TRACKING]
        pings = _Pings()
        while True:
            # The cache is held only between waits: listeners of a cluster's nodes each
            # holding it across their waits would, between them, never let it go.
            cache = self._cache()
            if cache is None or not cache.wanted(self._source):
                return
            if cache.reconnect:
                raise ConnectionError("a fetch saw another server: reconnecting")
            del cache
            if pings.due():
                at = time.monotonic()
                connection.send_command("PING")
                self._talk(self._probing(epoch), connections)
                pings.sent(at)
            if connection.can_read(timeout=pings.wait()):
                reply = connection.read_response()
                cache = self._cache()
                if cache is None:
                    return
                pings.read(cache, reply, self._source)
                del cache


class AsyncListener(_Listening):
    """The asyncio store's listener: a task on the loop of the fetch that started it,
    holding ``redis.asyncio`` connections.

    A loop that stops running stops the task's pings, so the cache stops serving within
    :data:`~alkey.localcache.LEASE` even if another loop goes on fetching; a fetch on a
    running loop then starts a new task (the old one, if its loop runs again, carries on
    beside it: two listeners of one server only make the cache empty itself once more).
    """

    _task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        """Start the task on the running loop unless one runs on a live loop (or the cache
        is closed)."""
        cache = self._cache()
        if cache is None or cache.closed:
            return
        task = self._task
        if task is not None and not task.done() and task.get_loop().is_running():
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            cache = self._cache()
            if cache is None or not cache.wanted(self._source):
                return
            connections: list[Any] = []
            try:
                connections.extend((await self._connect(), await self._connect()))
                epoch = await self._talk(self._subscribing(cache), connections)
                cache.connected(self._source, epoch)
                self._incidents.back()
                cache = None  # held only between waits (see Listener._serve)
                await self._serve(connections, epoch)
            except Exception as error:
                cache = None
                if not self._failed(error):
                    return
                await asyncio.sleep(self._retry_interval)
            except BaseException:
                cache = self._cache()
                if cache is not None:
                    cache.lost("the listener's task was cancelled", self._source)
                raise
            finally:
                for opened in connections:
                    with contextlib.suppress(Exception):
                        await opened.disconnect()

    @staticmethod
    async def _talk(talk: Talk[_T], connections: list[Any]) -> _T:
        """As :meth:`Listener._talk`, awaiting each reply."""
        try:
            which, command = next(talk)
            while True:
                connection = connections[which]
                await connection.send_command(*command)
                try:
                    reply = await connection.read_response()
                except Exception as error:
                    which, command = talk.throw(error)
                else:
                    which, command = talk.send(reply)
        except StopIteration as done:
            answer: _T = done.value
            return answer
        finally:
            talk.close()

    async def _serve(self, connections: list[Any], epoch: str) -> None:
        connection = connections[TRACKING]
        pings = _Pings()
        while True:
            cache = self._cache()
            if cache is None or not cache.wanted(self._source):
                return
            if cache.reconnect:
                raise ConnectionError("a fetch saw another server: reconnecting")
            del cache
            if pings.due():
                at = time.monotonic()
                await connection.send_command("PING")
                await self._talk(self._probing(epoch), connections)
                pings.sent(at)
            reply = await connection.read_response(
                timeout=max(pings.wait(), 0.001), disconnect_on_error=False
            )
            cache = self._cache()
            if cache is None:
                return
            if reply is not None:
                pings.read(cache, reply, self._source)
            del cache


class ClusterListeners:
    """The listeners of a cluster store: one per primary, as the client knows them.

    BCAST tracking is per server, so each primary gets a :class:`Listener` (or an
    :class:`AsyncListener`) of its own, and the cache serves only while every one of them
    is up (:meth:`~alkey.localcache.LocalTokens.expect`). The primaries are read from the
    client whenever the cache is not serving and on every cold fetch: a node added, a
    failover or a resharding the client has learnt of (a ``MOVED`` answer) changes them,
    which empties the cache and starts the new node's listener. A token fetched from a
    node no listener hears is not kept meanwhile (its epoch is no listener's).

    ``connector_for(node)`` returns what a node's listener connects with: a callable
    making a new tracking connection to it (awaited for an asyncio cluster), holding
    neither the node nor the client (a node refers to its client, which holds the store).
    """

    def __init__(
        self,
        cache: LocalTokens,
        cluster: Any,
        connector_for: Callable[[Any], Callable[[], Any]],
        *,
        retry_interval: float,
        asynchronous: bool = False,
    ) -> None:
        self._cache = weakref.ref(cache)
        self._cluster = cluster
        self._connector_for = connector_for
        self._retry_interval = retry_interval
        self._asynchronous = asynchronous
        self._listeners: dict[str, Listener | AsyncListener] = {}
        # Reentrant: an observer that hears of the flush a change of primaries makes may
        # build a key on this store.
        self._lock: threading.Lock | threading.RLock = threading.RLock()
        _after_fork_locks.add(self)

    def ensure_running(self) -> None:
        """Listen to every primary the client knows, and only to those."""
        cache = self._cache()
        if cache is None or cache.closed:
            return
        if getattr(self._cluster, "_initialize", False):
            return  # an asyncio cluster client not yet used: its first call discovers it
        with self._lock:
            primaries = {node.name: node for node in self._cluster.get_primaries()}
            cache.expect(primaries)
            # A listener no longer wanted ends by itself; one of a primary that comes
            # back is kept (its thread or task carries on if it still runs).
            for name, node in primaries.items():
                listener = self._listeners.get(name)
                if listener is None:
                    listener = self._listeners[name] = self._listener(cache, name, node)
                listener.ensure_running()

    def _listener(self, cache: LocalTokens, name: str, node: Any) -> Listener | AsyncListener:
        connect = self._connector_for(node)  # holds what to connect with, not the node
        if self._asynchronous:
            return AsyncListener(
                cache,
                connect,
                retry_interval=self._retry_interval,
                where=name,
                source=name,
                clustered=True,
            )
        return Listener(
            cache,
            connect,
            retry_interval=self._retry_interval,
            where=name,
            source=name,
            clustered=True,
        )


# Listeners whose lock a thread that did not survive a fork may hold: new ones in the child.
_after_fork_locks: weakref.WeakSet[Listener | ClusterListeners] = weakref.WeakSet()


def _new_locks() -> None:
    for holder in list(_after_fork_locks):
        holder._lock = (
            threading.RLock() if isinstance(holder, ClusterListeners) else threading.Lock()
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks)
