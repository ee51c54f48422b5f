"""Transports: how a token store's script calls travel to Redis, one per client kind.

Why a layer of its own: the store core (:class:`alkey.tokens.ScriptStore`) decides
*what* to send -- the script calls of one round trip, built by :mod:`alkey.scripts` --
and what an answer or a failure means for keys and bumps. A transport owns everything
that depends on the client library:

* sending a list of script calls in one round trip (one call: ``execute_command``;
  several: a non-transactional pipeline), as ``EVALSHA`` once the server knows a script
  and ``EVAL`` with its source before, reloading once after ``NOSCRIPT``;
* waiting for a connection of an exhausted pool (:func:`pool_waits`);
* its socket timeout (:func:`checked_socket_timeout`, with its warning) and the object a
  store is shared through (:attr:`RedisTransport.share_key`);
* **which errors mean what**: every client error leaves a transport as one of alkey's
  (:func:`store_error`), with the original as ``__cause__``, so the store core never
  sees a client library's exceptions, and a valkey-py or cluster transport plugs in with
  its own mapping.

Redis Cluster (:class:`ClusterTransport`, :class:`AsyncClusterTransport`): the calls come
split by hash slot (:class:`~alkey.scripts.ScriptCalls` with ``clustered=True``); each is
addressed to the node serving its slot, and one pipeline per node goes out to every node
before any answer is read, so a round trip touching three nodes costs the latency of
one. redis-py's cluster pipeline follows ``MOVED`` and ``ASK`` (a resharding) by itself.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions

from alkey.errors import (
    TokenStoreConfigurationError,
    TokenStoreError,
    TokenStorePoolExhaustedError,
    TokenStoreUnavailableError,
    redacted,
)
from alkey.scripts import CLEAR, Call, ScriptCalls

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "KNOWN_LIBRARIES",
    "POOL_WAIT",
    "REDIS_ERRORS",
    "AsyncRedisTransport",
    "ClientErrors",
    "Misconfiguration",
    "RedisClient",
    "RedisTransport",
    "checked_socket_timeout",
    "errors_of",
    "misconfiguration",
    "pool_waits",
    "server_of",
    "store_error",
]

log = logging.getLogger("alkey.tokens")

#: The synchronous redis-py client type alkey works with.
RedisClient: TypeAlias = redis.Redis
#: The asyncio redis-py client type alkey works with.
AsyncRedisClient: TypeAlias = "redis.asyncio.Redis"
#: redis-py's Redis Cluster client.
ClusterClient: TypeAlias = redis.cluster.RedisCluster
#: redis-py's asyncio Redis Cluster client.
AsyncClusterClient: TypeAlias = redis.asyncio.cluster.RedisCluster

#: Seconds a call waits for a connection from an exhausted pool when its client has no
#: socket timeout to go by (otherwise it waits that long: see :func:`pool_waits`).
POOL_WAIT = 2.0

#: What a pool raises, as a plain ``ConnectionError``, when it has no connection to give:
#: redis-py's ``BlockingConnectionPool`` (sync and asyncio) when none came back within its
#: ``timeout``, and its ``ConnectionPool`` at ``max_connections`` before redis-py 6.4
#: (which raises ``MaxConnectionsError`` instead).
_POOL_FULL_ARGS = ("Too many connections",)
_POOL_EXHAUSTED_ARGS = (("No connection available.",), _POOL_FULL_ARGS)


def _pool_full(error: BaseException, errors: ClientErrors) -> bool:
    """Whether ``error`` is a pool at ``max_connections`` refusing at once (worth waiting
    for a connection to come back: :func:`pool_waits`)."""
    return isinstance(error, errors.max_connections) or error.args == _POOL_FULL_ARGS


def _pool_exhausted(error: BaseException, errors: ClientErrors) -> bool:
    """Whether ``error`` says the pool had no free connection (not that Redis is down)."""
    return isinstance(error, errors.max_connections) or error.args in _POOL_EXHAUSTED_ARGS


class ClientErrors:
    """Which exceptions of one client library mean what, for :func:`store_error`.

    Why per library: valkey-py is a fork of redis-py with the same classes under other
    names (``valkey.exceptions.ConnectionError`` is no ``redis.exceptions.ConnectionError``),
    and a client error that slipped through unmapped would break the outage guarantee --
    a ``session.commit()`` raising after the database committed, a key generation
    raising instead of missing. So each transport asks :func:`errors_of` for the classes
    of its own client's library, and every library's errors take the same way out.
    """

    __slots__ = (
        "base",
        "lost",
        "max_connections",
        "no_script",
        "redirected",
        "response",
        "unavailable",
    )

    def __init__(self, exceptions: Any) -> None:
        named = vars(exceptions)
        #: Every error the library raises for a command (its ``RedisError``/``ValkeyError``).
        self.base: tuple[type[Exception], ...] = (named.get("RedisError") or named["ValkeyError"],)
        #: No connection free in the pool.
        self.max_connections: tuple[type[Exception], ...] = (named["MaxConnectionsError"],)
        #: ``NOSCRIPT``: the server forgot a script (restart, ``SCRIPT FLUSH``).
        self.no_script: tuple[type[Exception], ...] = (named["NoScriptError"],)
        #: An error answer of the server.
        self.response: tuple[type[Exception], ...] = (named["ResponseError"],)
        #: No answer: the connection was refused or lost, or the answer took too long.
        self.lost: tuple[type[Exception], ...] = (named["ConnectionError"], named["TimeoutError"])
        #: ``MOVED`` or ``ASK``: a cluster slot that another node serves (now or for a key).
        self.redirected: tuple[type[Exception], ...] = tuple(
            named[name] for name in ("MovedError", "AskError") if name in named
        )
        #: Answers of a server that cannot serve now but will (a restart, a failover, a
        #: cluster resharding): refused, lost, timed out, ``LOADING``, authentication
        #: (but :func:`misconfiguration` tells a refused password or TLS certificate first),
        #: ``READONLY`` (a replica, or a primary demoted by a failover), ``MASTERDOWN``,
        #: cluster down, ``TRYAGAIN`` -- those of the library's version that exist.
        self.unavailable: tuple[type[Exception], ...] = tuple(
            named[name]
            for name in (
                "ConnectionError",
                "TimeoutError",
                "ReadOnlyError",
                "MasterDownError",
                "ClusterDownError",
                "TryAgainError",
            )
            if name in named
        )

    @classmethod
    def merged(cls, *libraries: ClientErrors) -> ClientErrors:
        """The errors of all ``libraries`` at once: what a client of no known library is
        mapped by, so that an error of any library alkey knows still takes the way out."""
        merged = cls.__new__(cls)
        for name in cls.__slots__:
            setattr(merged, name, tuple({c: None for e in libraries for c in getattr(e, name)}))
        return merged


#: redis-py's errors (also what :func:`store_error` maps by default).
REDIS_ERRORS = ClientErrors(redis.exceptions)


def _cluster_errors(exceptions: Any) -> ClientErrors:
    """A library's errors as its cluster client raises them: also its
    ``RedisClusterException``s, which are no ``RedisError``. What means the cluster cannot
    serve now, and will: a ``RedisClusterException`` (redis-py's cluster client raises
    them when no node answers its discovery, or no node is known to serve a slot, as
    during a failover: ``SlotNotCoveredError``), ``MOVED``/``ASK`` answers left once the
    client followed its redirections, and its ``ClusterError`` ("TTL exhausted": it gave
    up after too many redirections or ``TRYAGAIN`` answers, as while a slot's keys are
    half moved)."""
    errors = ClientErrors(exceptions)
    named = vars(exceptions)
    cluster = named.get("RedisClusterException") or named["ValkeyClusterException"]
    errors.base = (*errors.base, cluster)
    errors.unavailable = (
        *errors.unavailable,
        named["ClusterError"],  # "TTL exhausted": redirections or TRYAGAIN, too many
        named["AskError"],  # MOVED or ASK, still, after the client followed them
        cluster,  # no node reachable to map the slots, a slot no node serves...
    )
    return errors


#: redis-py's errors, as its cluster clients raise them.
CLUSTER_ERRORS = _cluster_errors(redis.exceptions)
_errors_by_library: dict[tuple[str | None, bool], ClientErrors] = {
    ("redis", False): REDIS_ERRORS,
    ("redis", True): CLUSTER_ERRORS,
}


#: The client libraries whose errors alkey maps: redis-py and valkey-py (its fork).
KNOWN_LIBRARIES = ("redis", "valkey")


def _library_of(client: object) -> str | None:
    """The known library that ``client``'s class comes from, through its bases too: an
    application's ``class AppClient(valkey.Valkey)`` is valkey-py's."""
    for cls in type(client).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in KNOWN_LIBRARIES:
            return package
    return None


def errors_of(client: object) -> ClientErrors:
    """The error classes of ``client``'s library -- redis-py's, or valkey-py's for a
    valkey client, found through the client's class and its bases -- and for a cluster
    client with its cluster errors (``_cluster_errors()``).

    Fails closed: a client of neither library is mapped by the errors of every known
    library that is installed, so that none of them can escape a commit.
    """
    library = _library_of(client)
    clustered = is_cluster(client)
    key = (library, clustered)
    errors = _errors_by_library.get(key)
    if errors is None:
        known = [library] if library is not None else list(KNOWN_LIBRARIES)
        found = []
        for name in known:
            try:
                module = importlib.import_module(f"{name}.exceptions")
            except ImportError:  # valkey-py is optional
                continue
            found.append(_cluster_errors(module) if clustered else ClientErrors(module))
        errors = found[0] if len(found) == 1 else ClientErrors.merged(*found)
        _errors_by_library[key] = errors
    return errors


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client -- redis-py's ``RedisCluster`` (sync
    or asyncio), or one laid out like it (valkey-py's ``ValkeyCluster``): it maps slots
    to nodes and has no connection pool of its own."""
    return hasattr(client, "nodes_manager") and hasattr(client, "get_node_from_key")


# Error answers of a server that cannot serve now but will, whichever class a client
# library gives them: a long script, a replica, a primary cut off from its replicas.
_CANNOT_SERVE_NOW = ("BUSY ", "READONLY ", "NOREPLICAS ")


def store_error(
    error: Exception,
    errors: ClientErrors = REDIS_ERRORS,
    server: str = "",
    *,
    clustered: bool = False,
) -> TokenStoreError:
    """alkey's error for a client library's error (raise it ``from error``).

    * no connection free in the pool, even after waiting (``MaxConnectionsError``, or a
      ``BlockingConnectionPool``'s timeout) -> :class:`~alkey.errors.TokenStorePoolExhaustedError`:
      Redis is fine, this process ran out of connections;
    * Redis answers, but not to alkey as configured -- a TLS certificate or handshake
      refused, a wrong password, an ACL refusal (``NOPERM``), a plain client at a
      cluster node (``CROSSSLOT``, ``MOVED``, ``ASK``), a cluster client at a plain Redis,
      a database the server lacks, scripting disabled (see :func:`misconfiguration`) ->
      :class:`~alkey.errors.TokenStoreConfigurationError`, whose message names the
      server (``server``, from :func:`server_of`), what is wrong and what to fix: waiting
      would not help, so it must not read as an outage;
    * Redis cannot be reached or cannot serve now -- connection refused or lost,
      timeouts, ``LOADING``, ``BUSY`` (a long script), ``READONLY`` (a replica),
      ``MASTERDOWN``, ``NOREPLICAS`` (a primary cut off from its replicas, under
      ``min-replicas-to-write``), cluster down -> :class:`~alkey.errors.TokenStoreUnavailableError`;
      through a cluster client also
      a failover or resharding under way (see ``_cluster_errors()``);
    * anything else (``OOM`` of a full Redis, a wrong type...) ->
      :class:`~alkey.errors.TokenStoreError`.

    ``errors``: the classes of the library that raised it (:func:`errors_of`; default
    redis-py's); ``clustered``: whether a cluster client raised it. The message is the
    client's own, which names host and port, with anything like a password masked
    (:func:`~alkey.errors.redacted`).
    """
    args = tuple(redacted(arg) if isinstance(arg, str) else arg for arg in error.args)
    if _pool_exhausted(error, errors):
        return TokenStorePoolExhaustedError(*args)
    found = misconfiguration(error, errors, clustered=clustered)
    if found is not None:
        where = server or "Redis"
        return TokenStoreConfigurationError(
            f"alkey cannot use {where}: {found.problem}: {found.fix}",
            server=where,
            problem=found.problem,
            fix=found.fix,
        )
    if isinstance(error, errors.unavailable) or (
        isinstance(error, errors.response) and str(error).startswith(_CANNOT_SERVE_NOW)
    ):
        return TokenStoreUnavailableError(*args)
    return TokenStoreError(*args)


class Misconfiguration(NamedTuple):
    """What :func:`misconfiguration` found wrong: its ``kind``, the ``problem`` as an
    operator reads it, and the ``fix``.

    Why a kind: the startup check (:func:`alkey.client.check_redis`) and the command line
    (:mod:`alkey.cli`) say more for some kinds (the exact ACL rule for ``"permissions"``)
    and exit with a code per kind, from this one reading of the error.
    """

    #: ``"tls"``, ``"credentials"``, ``"permissions"``, ``"cluster"``, ``"database"`` or
    #: ``"scripting"``.
    kind: str
    #: What is wrong, e.g. "the server's TLS certificate was not accepted (...)".
    problem: str
    #: What to change, e.g. "check ssl_ca_certs ...".
    fix: str


#: What a client library makes of a cluster node's answers to a call that a plain client
#: sent it: keys of several slots (``CROSSSLOT``), or of a slot another node serves.
_CLUSTER_NODE_ANSWERS = ("ClusterCrossSlotError", "AskError", "MovedError")
#: A client library's errors for credentials the server refused (by class name, so that
#: valkey-py's count too): ``WRONGPASS``, ``NOAUTH``, ``invalid password``, an ``AUTH``
#: the server has no password for.
_AUTHENTICATION = ("AuthenticationError", "AuthenticationWrongNumberOfArgsError")
#: TLS errors of a connection that ended, rather than a handshake refused: an outage.
_TLS_CONNECTION_LOST = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
_TLS_FIX = (
    "check ssl_ca_certs (the authority that signed the server's certificate), "
    "ssl_check_hostname and the host in the rediss:// URL, or the server's certificate"
)
_TLS_REFUSED_BY_SERVER = (
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
)


def _tls_error(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``error`` (redis-py wraps it in its ``ConnectionError``, as
    the ``__cause__`` or the ``__context__``), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
    return None


#: The texts redis-py 5 (and valkey-py) leave of the answers it turns into classes, without
#: their codes: (class name, how the text begins, the code Redis sent).
_BARE_TEXTS = (
    ("AuthenticationError", "Authentication required", "NOAUTH"),
    ("AuthenticationError", "invalid username-password pair", "WRONGPASS"),
    ("NoPermissionError", "this user has no permissions", "NOPERM"),
)


def _code_of_bare_text(name: str, text: str) -> str | None:
    """The code of a client error whose text lost it (see :data:`_BARE_TEXTS`)."""
    for bare_name, begins, code in _BARE_TEXTS:
        if name == bare_name and text.startswith(begins):
            return code
    return None


def misconfiguration(
    error: BaseException, errors: ClientErrors = REDIS_ERRORS, *, clustered: bool = False
) -> Misconfiguration | None:
    """What is wrong (a :class:`Misconfiguration`) when ``error`` says Redis answers but
    not to alkey as it is configured, so that waiting will not help; ``None`` for anything
    else (an outage, a full Redis...). See :class:`~alkey.errors.TokenStoreConfigurationError`.

    Why by the error's class *name* and text as well as its class: redis-py wraps a TLS
    failure in its ``ConnectionError`` (the ``ssl.SSLError`` is its cause), valkey-py
    has the same classes under its own module, and a cluster client's
    ``RedisClusterException`` says "Cluster mode is not enabled" only in its text. A
    connection that merely ended during a TLS handshake (EOF) stays an outage, and so do
    ``MOVED``/``ASK`` through a cluster client (``clustered``), which follows them: one
    left over is a slot changing hands.
    """
    text = redacted(str(error))
    name = type(error).__name__
    # redis-py keeps an error answer's code (WRONGPASS, NOPERM...) apart from its text;
    # before 6 it dropped the code of the errors it has classes for: put it back.
    code = getattr(error, "status_code", None) or _code_of_bare_text(name, text)
    if isinstance(code, str) and code and not text.startswith(code):
        text = f"{code} {text}"
    tls = _tls_error(error)
    if tls is not None and not isinstance(tls, _TLS_CONNECTION_LOST):
        if isinstance(tls, ssl.SSLCertVerificationError):
            detail = tls.verify_message or tls.reason or "certificate verify failed"
            reason = tls.reason or "CERTIFICATE_VERIFY_FAILED"
            return Misconfiguration(
                "tls",
                f"the server's TLS certificate was not accepted ({reason}: {detail})",
                _TLS_FIX,
            )
        reason = tls.reason or type(tls).__name__
        if reason == "WRONG_VERSION_NUMBER" or "record layer" in str(tls).lower():
            return Misconfiguration(
                "tls",
                f"the server does not speak TLS on this port ({reason})",
                "use a redis:// URL for a plain port, or the server's TLS port with rediss://",
            )
        if reason in _TLS_REFUSED_BY_SERVER:
            return Misconfiguration(
                "tls",
                f"the server refused the TLS handshake ({reason})",
                "check ssl_certfile and ssl_keyfile (a client certificate the server's "
                "tls-ca-cert-file trusts) and the TLS versions and ciphers on both sides",
            )
        return Misconfiguration(
            "tls",
            f"the TLS handshake failed ({reason})",
            "check the rediss:// URL and its ssl_* options against the server's TLS settings",
        )
    if name in _AUTHENTICATION or text.startswith(("WRONGPASS", "NOAUTH", "invalid password")):
        if text.startswith("NOAUTH") or "HELLO must be called with the client already" in text:
            return Misconfiguration(
                "credentials",
                f"the server requires a password and alkey gave none ({text})",
                "put it in the URL, percent-encoded (redis://:password@host:6379/0), or in "
                "the client's password option",
            )
        return Misconfiguration(
            "credentials",
            f"the server refused alkey's credentials ({text})",
            "check the user name and password in the URL (percent-encoded) or the "
            "client's options against the server's requirepass or ACL users",
        )
    lowered = text.lower()
    if (
        name in ("NoPermissionError", "AuthorizationError")
        or "NOPERM" in text
        or "can't run this command" in lowered  # a command a script calls, denied
        or "can't access at least one of the keys" in lowered
    ):
        return Misconfiguration(
            "permissions",
            f"the server's ACL denies alkey's user a command or key it needs ({text})",
            "grant the user EVAL, EVALSHA and what alkey's scripts call (+eval +evalsha "
            "+mget +set +info +ping; durable mode also +time +zadd +zrangebyscore +zrem "
            "+hset +hget +hdel) on the token keys (~alkey:*, or ~<key_prefix>alkey:*), "
            "e.g. with ACL SETUSER; 'alkey check' lists them",
        )
    if clustered and name == "ClusterCrossSlotError":
        return Misconfiguration(
            "cluster",
            f"the keys of one of alkey's calls hash to different slots ({text})",
            "check key_prefix: a '{' in it makes a hash tag that must name one slot "
            "for all of a call's keys, or none",
        )
    if not clustered and (
        isinstance(error, errors.response)
        and (text.startswith("CROSSSLOT") or name in _CLUSTER_NODE_ANSWERS)
    ):
        return Misconfiguration(
            "cluster",
            f"this Redis is a node of a Redis Cluster ({name}: {text})",
            "give alkey a redis.cluster.RedisCluster (redis.asyncio.cluster.RedisCluster "
            "under asyncio), which sends each hash slot's keys to the node that serves it",
        )
    if "Cluster mode is not enabled" in text or "cluster support disabled" in text:
        return Misconfiguration(
            "cluster",
            f"this Redis is no Redis Cluster ({text})",
            "give alkey a redis.Redis (or a redis:// URL) for it, or enable cluster mode",
        )
    if isinstance(error, errors.response) and "DB index is out of range" in text:
        return Misconfiguration(
            "database",
            f"the server has no such database ({text})",
            "use a database number below the server's 'databases' setting (the URL's "
            "path, ?db= or REDIS_DB); a Redis Cluster has database 0 only",
        )
    if isinstance(error, errors.response) and text.lower().startswith("unknown command"):
        return Misconfiguration(
            "scripting",
            f"the server does not know a command alkey sends ({text})",
            "alkey needs Lua scripting (EVAL, EVALSHA): the server must not rename or disable them",
        )
    return None


def server_of(client: object) -> str:
    """Which Redis ``client`` talks to, in words for a message: ``"Redis at host:port"``,
    ``"Redis at /path/to/socket"``, the primary of a Sentinel service, or the nodes a
    cluster client started from. Never credentials: only host, port, path or name."""
    if is_cluster(client):
        manager = getattr(client, "nodes_manager", None)
        nodes = sorted(str(name) for name in getattr(manager, "startup_nodes", {}) or {})
        shown = ",".join(nodes[:3]) + (",..." if len(nodes) > 3 else "")
        return f"the Redis Cluster at {shown}" if shown else "the Redis Cluster"
    pool = getattr(client, "connection_pool", None)
    service = getattr(pool, "service_name", None)
    if isinstance(service, str):
        return f"the primary of Sentinel service {service!r}"
    options = getattr(pool, "connection_kwargs", {}) or {}
    if options.get("path"):
        return f"Redis at {options['path']}"
    return f"Redis at {options.get('host', 'localhost')}:{options.get('port', 6379)}"


def pool_waits(pool_wait: float) -> Iterator[float]:
    """The pauses of a call whose pool has no free connection, one before each new try:
    short and growing, ``pool_wait`` seconds in all; then the call goes without Redis
    (:meth:`alkey.outages.OutageLedger.exhausted`).

    Why wait: alkey holds a connection for one round trip, so one is usually free again
    about a round trip later, while going without costs more -- a miss costs the
    application a query and a render, and a bump kept for replay leaves the other
    processes, whose Redis answers, on the old tokens until the replay. Why no longer than
    the client's socket timeout: that is how long the application lets a call wait for
    Redis anyway. The pool refuses before anything is sent, so trying again never sends a
    command twice.
    """
    deadline = time.monotonic() + pool_wait
    pause = 0.0005
    while (left := deadline - time.monotonic()) > 0:
        yield min(pause, left)
        pause = min(pause * 2, 0.005)


class RedisTransport:
    """Script calls over a synchronous ``redis.Redis`` (redis-py), one round trip each.

    :meth:`run` raises only alkey's errors (see :func:`store_error`).
    """

    #: Whether calls must be split by hash slot (a Redis Cluster): not here.
    clustered = False

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        #: The client's socket timeout (0 if none), which a store adds to its recovery
        #: window; a warning if the client can wait for a hung Redis without bound.
        self.socket_timeout = checked_socket_timeout(client.connection_pool)
        #: Seconds a call waits for a connection when the pool has none free.
        self.pool_wait = self.socket_timeout or POOL_WAIT
        #: What stores are shared through (:func:`alkey.tokens.store_for`): the pool, so
        #: that clients made per request from one pool share one store.
        self.share_key: object | None = client.connection_pool
        #: What the client's library raises, and what each error means.
        self.errors = errors_of(client)
        #: Which Redis the client talks to, for messages (:func:`server_of`).
        self.server = server_of(client)
        self._loaded: frozenset[str] = frozenset()

    def run(self, calls: list[Call]) -> list[Any]:
        """Send the script calls in one round trip, waiting for a connection if the pool
        has none free (see :func:`pool_waits`); their results, in order."""
        waits: Iterator[float] | None = None
        while True:
            try:
                return self._run_once(calls)
            except Exception as error:
                errors = self.errors
                if not isinstance(error, errors.base):
                    raise
                if not _pool_full(error, errors):
                    raise store_error(
                        error, errors, self.server, clustered=self.clustered
                    ) from error
                waits = pool_waits(self.pool_wait) if waits is None else waits
                pause = next(waits, None)
                if pause is None:
                    raise store_error(
                        error, errors, self.server, clustered=self.clustered
                    ) from error
                time.sleep(pause)

    def _run_once(self, calls: list[Call]) -> list[Any]:
        """Send the script calls in one round trip.

        A script this transport has not run yet goes out as ``EVAL`` with its source,
        which also loads it; after that, ``EVALSHA``. If Redis has forgotten it (restart,
        ``SCRIPT FLUSH``), the ``NOSCRIPT`` answer costs one more round trip, once.
        """
        try:
            results = self._send(calls, self._loaded)
        except self.errors.no_script:
            self._loaded = frozenset()
            results = self._send(calls, self._loaded)
        self._loaded = ScriptCalls.loaded_after(self._loaded, calls)
        return results

    def _send(self, calls: list[Call], loaded: frozenset[str]) -> list[Any]:
        commands = ScriptCalls.commands(calls, loaded)
        if len(commands) == 1:
            return [self.client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)  # type: ignore[no-untyped-call]
        return ScriptCalls.checked(pipe.execute(raise_on_error=False))


class AsyncRedisTransport:
    """Script calls over ``redis.asyncio.Redis``, one awaited round trip each.

    ``client``, or, without one, ``get_client``: awaited on every call for the client to
    use (each event loop's default client, as :mod:`alkey.asyncio` does), with
    ``socket_timeout`` the timeout those clients are configured with. Such a transport
    has no :attr:`share_key`. :meth:`run` raises only alkey's errors.
    """

    #: As :attr:`RedisTransport.clustered`.
    clustered = False

    def __init__(
        self,
        client: AsyncRedisClient | None = None,
        *,
        get_client: Callable[[], Awaitable[AsyncRedisClient]] | None = None,
        socket_timeout: float = 0.0,
    ) -> None:
        if (client is None) == (get_client is None):
            raise TypeError("pass either client or get_client")
        self.client = client
        self._get_client = get_client
        if client is not None:
            socket_timeout = checked_socket_timeout(client.connection_pool)
        #: As :attr:`RedisTransport.socket_timeout`.
        self.socket_timeout = socket_timeout
        #: As :attr:`RedisTransport.pool_wait`.
        self.pool_wait = socket_timeout or POOL_WAIT
        #: As :attr:`RedisTransport.share_key` (``None``: a client per loop, no pool).
        self.share_key: object | None = client.connection_pool if client is not None else None
        #: As :attr:`RedisTransport.errors` (``get_client``'s clients: learnt on first use).
        self.errors = errors_of(client) if client is not None else REDIS_ERRORS
        #: As :attr:`RedisTransport.server` (``get_client``'s clients: learnt on first use).
        self.server = server_of(client) if client is not None else "Redis"
        self._loaded: frozenset[str] = frozenset()

    async def run(self, calls: list[Call]) -> list[Any]:
        """As :meth:`RedisTransport.run`, without blocking the event loop."""
        waits: Iterator[float] | None = None
        while True:
            try:
                return await self._run_once(calls)
            except Exception as error:
                errors = self.errors  # learnt from the client (see _run_once)
                if not isinstance(error, errors.base):
                    raise
                if not _pool_full(error, errors):
                    raise store_error(
                        error, errors, self.server, clustered=self.clustered
                    ) from error
                waits = pool_waits(self.pool_wait) if waits is None else waits
                pause = next(waits, None)
                if pause is None:
                    raise store_error(
                        error, errors, self.server, clustered=self.clustered
                    ) from error
                await asyncio.sleep(pause)

    async def _run_once(self, calls: list[Call]) -> list[Any]:
        client = self.client
        if client is None:
            assert self._get_client is not None
            client = await self._get_client()
            self.errors = errors_of(client)
            self.server = server_of(client)
        try:
            results = await self._send(client, calls, self._loaded)
        except self.errors.no_script:
            self._loaded = frozenset()
            results = await self._send(client, calls, self._loaded)
        self._loaded = ScriptCalls.loaded_after(self._loaded, calls)
        return results

    @staticmethod
    async def _send(
        client: AsyncRedisClient, calls: list[Call], loaded: frozenset[str]
    ) -> list[Any]:
        commands = ScriptCalls.commands(calls, loaded)
        if len(commands) == 1:
            return [await client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return ScriptCalls.checked(await pipe.execute(raise_on_error=False))


# -- Redis Cluster ----------------------------------------------------------------------------


def _waves(calls: list[Call], nodes: list[str]) -> list[list[int]]:
    """The positions of ``calls`` (addressed to ``nodes``) in the order their pipelines may
    go out: usually one wave, to every node at once.

    Why sometimes two: durable mode clears an intent (:data:`~alkey.scripts.CLEAR`) in the
    round trip of the bump that carries it out, and the clear must never succeed where the
    bump failed -- the intent is what lets another process make the bump. On one Redis
    they share a connection and fail together; on a cluster the intents live on their own
    slot, whose node can answer while a bump's node is down -- or while a bump's slot,
    even on the same node, is half moved (``TRYAGAIN``) or redirected. So the clear -- and
    what follows it on its node, to keep that node's order -- waits until every other
    call has succeeded: one more round trip, for durable writing commits on a cluster
    only.
    """
    everything = list(range(len(calls)))
    first = next((i for i, (script, _, _) in enumerate(calls) if script is CLEAR), None)
    if first is None or first == 0:
        return [everything]
    later = [i for i in everything if i >= first and nodes[i] == nodes[first]]
    after = set(later)
    return [[i for i in everything if i not in after], later]


class _ClusterRoundTrip:
    """One round trip of script calls on a cluster: the node each call goes to, each
    node's loaded scripts (``EVALSHA`` there, ``EVAL`` with the source elsewhere), and the
    results as they come."""

    def __init__(
        self,
        calls: list[Call],
        nodes: list[Any],
        loaded: dict[str, frozenset[str]],
        errors: ClientErrors,
    ) -> None:
        self.calls = calls
        self.nodes = nodes
        self.names: list[str] = [node.name for node in nodes]
        self.loaded = loaded
        self.errors = errors
        self.results: list[Any] = [None] * len(calls)

    def commands(self, positions: list[int]) -> list[tuple[tuple[Any, ...], Any]]:
        """The command of each call at ``positions``, with its node."""
        return [
            (
                ScriptCalls.commands([self.calls[i]], self.loaded.get(self.names[i], frozenset()))[
                    0
                ],
                self.nodes[i],
            )
            for i in positions
        ]

    def answered(self, positions: list[int], results: list[Any]) -> bool:
        """Keep the results of the calls at ``positions``; whether a node answered
        ``NOSCRIPT`` (it restarted, was promoted, or flushed its scripts), whose scripts
        are then forgotten, so that sending the calls again carries their sources. A
        ``NOSCRIPT`` is kept as a result too: if the calls are not sent again, or meet it
        again, the call fails -- never a call counted as run that did not run."""
        forgot = False
        for i, result in zip(positions, results, strict=True):
            name = self.names[i]
            self.results[i] = result
            if isinstance(result, self.errors.no_script):
                self.loaded[name] = frozenset()
                forgot = True
            elif not isinstance(result, Exception):
                self.loaded[name] = self.loaded.get(name, frozenset()) | {self.calls[i][0].sha}
        return forgot

    def checked(self, positions: list[int]) -> None:
        """Raise the first error among the results at ``positions``."""
        ScriptCalls.checked([self.results[i] for i in positions])


def _queued(pipe: Any) -> Any:
    """A cluster pipeline's queued commands: its execution strategy's queue (redis-py 6
    and later, which keep an unused ``command_stack``), else ``command_stack`` (redis-py
    5, valkey-py)."""
    strategy = getattr(pipe, "_execution_strategy", None)
    return strategy.command_queue if strategy is not None else pipe.command_stack


def _cluster_failure(
    transport: ClusterTransport | AsyncClusterTransport, error: Exception
) -> Exception:
    """What a failed cluster call raises, and whether the next one reads the topology.

    A node failed or a slot moved: the next call asks the cluster who serves what first
    (``CLUSTER SLOTS``, once), or a failed-over primary's slots would go on being sent to
    the dead node -- but not for an exhausted pool, which says nothing of the topology
    (and reading it again would drop connections that other calls are using). An
    exception of no client library -- redis-py's cluster internals raise ``TypeError``
    and the like when connections are dropped under them -- fails closed, as the
    library's ``ConnectionError``: never an exception out of a commit.
    """
    errors = transport.errors
    if not isinstance(error, errors.base):
        transport._rediscover = True
        return errors.lost[0](f"the cluster client failed: {type(error).__name__}: {error}")
    if isinstance(error, errors.unavailable) and not _pool_exhausted(error, errors):
        transport._rediscover = True
    return error


def _set_up_cluster(
    transport: ClusterTransport | AsyncClusterTransport, client: ClusterClient | AsyncClusterClient
) -> None:
    """What the sync and asyncio cluster transports start with, instead of the one-Redis
    transports' set-up: the cluster client in place of a pool, which the stores are also
    shared through (it owns every node's pool), and no node's scripts known yet."""
    transport.client = client  # type: ignore[assignment]
    transport.socket_timeout = checked_socket_timeout(_cluster_options(client))
    transport.pool_wait = transport.socket_timeout or POOL_WAIT
    transport.share_key = client
    transport.errors = errors_of(client)
    transport.server = server_of(client)
    transport._loaded = frozenset()
    transport._node_scripts = {}
    transport._rediscover = False


class ClusterTransport(RedisTransport):
    """Script calls over redis-py's ``redis.cluster.RedisCluster``: one pipeline per node
    touched, each written before any is read, so a round trip costs the latency of the
    slowest node, not the sum (``tests/test_cluster.py`` measures it).

    Each call is addressed to the node serving its slot (``target_nodes``): left to
    itself, redis-py 8's sync cluster pipeline asks a server for the keys of every
    ``EVAL`` and ``EVALSHA`` (``COMMAND GETKEYS``) first, one round trip per call, one
    after the other. A call answered ``MOVED`` or ``ASK`` (a slot changing hands) is sent
    again by redis-py to the node named, before the pipeline returns. Which scripts are
    loaded is tracked per node: a node that never ran one, or forgot it, gets its source.
    """

    clustered = True
    #: Which scripts each node (by name) has run: a node that forgot them gets the source.
    _node_scripts: dict[str, frozenset[str]]
    #: Whether the next call reads the topology again (a call failed: a node may be gone).
    _rediscover: bool

    def __init__(self, client: ClusterClient) -> None:
        self.cluster = client
        _set_up_cluster(self, client)
        limit = _cluster_options(client).connection_kwargs.get("max_connections")
        #: How many of alkey's calls may run at once: the nodes' pool size, if bounded.
        self._calls = (
            threading.BoundedSemaphore(limit)
            if isinstance(limit, int) and 0 < limit < 2**31
            else None
        )

    def _run_once(self, calls: list[Call]) -> list[Any]:
        client = self.cluster
        if self._calls is not None and not self._calls.acquire(blocking=False):
            # As many of alkey's calls at once as the nodes' pools have connections: one
            # more would make redis-py's cluster pipeline read the whole topology again,
            # dropping the connections other threads are reading from.
            raise self.errors.max_connections[0]("No connection available.")
        try:
            if self._rediscover:
                client.nodes_manager.initialize()
                self._rediscover = False
            nodes = [self._node(keys[0]) for _, keys, _ in calls]
            trip = _ClusterRoundTrip(calls, nodes, self._node_scripts, self.errors)
            for wave in _waves(calls, trip.names):
                if trip.answered(wave, self._pipeline(trip.commands(wave))):
                    # A node forgot its scripts: the whole wave again, in order, with the
                    # sources where forgotten -- sending only the forgotten calls would
                    # run them after later calls to the same keys (a fetch behind its
                    # bump). Running a call twice is harmless: a token bumped twice is
                    # as new, a fetch answers the latest.
                    trip.answered(wave, self._pipeline(trip.commands(wave)))
                trip.checked(wave)
        except Exception as error:
            failure = _cluster_failure(self, error)
            if failure is error:
                raise
            raise failure from error
        finally:
            if self._calls is not None:
                self._calls.release()
        return trip.results

    def _node(self, key: str) -> Any:
        """The node that serves ``key``'s slot, as far as the client knows."""
        return self.cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]

    def _pipeline(
        self, commands: list[tuple[tuple[Any, ...], Any]], *, follow: bool = False
    ) -> list[Any]:
        """Each command to its node, every node's in one pipeline, all written before any
        is read; their results, errors included.

        Not following redirections the first time: redis-py would then send every call
        of a node that did not answer again, one after the other, each waiting a socket
        timeout -- a minute, for a bump of thirty rows on a hung node. A node that did not
        answer fails the whole call at once instead (it is an outage); calls answered
        ``MOVED`` or ``ASK`` (a slot changing hands; their nodes answer) are sent again,
        in order, following the redirections (``follow``)."""
        pipe = self.cluster.pipeline(transaction=False)  # type: ignore[no-untyped-call]
        for command, node in commands:
            pipe.execute_command(*command, target_nodes=node)
        if follow:
            followed: list[Any] = pipe.execute(raise_on_error=False)
            return followed
        try:
            results: list[Any] = pipe.send_cluster_commands(
                _queued(pipe), raise_on_error=False, allow_redirections=False
            )
        finally:
            pipe.reset()
        lost = next((r for r in results if isinstance(r, self.errors.lost)), None)
        if lost is not None:
            raise lost
        moved = [i for i, r in enumerate(results) if isinstance(r, self.errors.redirected)]
        if moved:
            again = self._pipeline([commands[i] for i in moved], follow=True)
            for i, result in zip(moved, again, strict=True):
                results[i] = result
        return results


class AsyncClusterTransport(AsyncRedisTransport):
    """:class:`ClusterTransport` for ``redis.asyncio.cluster.RedisCluster``, whose cluster
    pipeline sends each node's commands in a task of its own, all gathered."""

    clustered = True
    #: Which scripts each node (by name) has run: a node that forgot them gets the source.
    _node_scripts: dict[str, frozenset[str]]
    #: Whether the next call reads the topology again (a call failed: a node may be gone).
    _rediscover: bool

    def __init__(self, client: AsyncClusterClient) -> None:
        self.cluster = client
        self._get_client = None
        _set_up_cluster(self, client)

    async def _run_once(self, calls: list[Call]) -> list[Any]:
        client = self.cluster
        try:
            if client._initialize:  # first use: discover the cluster
                await client.initialize()
            elif self._rediscover:
                await client.nodes_manager.initialize()
            self._rediscover = False
            nodes = [client.get_node_from_key(keys[0]) for _, keys, _ in calls]
            trip = _ClusterRoundTrip(calls, nodes, self._node_scripts, self.errors)
            for wave in _waves(calls, trip.names):
                if trip.answered(wave, await self._pipeline(trip.commands(wave))):
                    # As ClusterTransport: the whole wave again, in order.
                    trip.answered(wave, await self._pipeline(trip.commands(wave)))
                trip.checked(wave)
        except Exception as error:
            # As ClusterTransport; and the asyncio cluster pipeline never asks the cluster
            # again by itself after a node failed.
            failure = _cluster_failure(self, error)
            if failure is error:
                raise
            raise failure from error
        return trip.results

    async def _pipeline(self, commands: list[tuple[tuple[Any, ...], Any]]) -> list[Any]:
        pipe = self.cluster.pipeline(transaction=False)
        for command, node in commands:
            pipe.execute_command(*command, target_nodes=node)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


class _ClusterOptions:
    """A cluster client's connection options, shaped like a connection pool's, for
    :func:`checked_socket_timeout`: every node's connections are made with them."""

    def __init__(self, options: dict[str, Any], connection_class: Any, retry: Any) -> None:
        self.connection_kwargs = {**options, "retry": retry}
        self.connection_class = connection_class


def _cluster_options(client: ClusterClient | AsyncClusterClient) -> _ClusterOptions:
    manager = getattr(client, "nodes_manager", None)
    options: dict[str, Any] = dict(
        getattr(client, "connection_kwargs", None) or getattr(manager, "connection_kwargs", {})
    )
    asyncio_client = isinstance(client, redis.asyncio.cluster.RedisCluster)
    default = redis.asyncio.Connection if asyncio_client else redis.Connection
    return _ClusterOptions(options, options.pop("connection_class", default), client.retry)


def transport_for(client: RedisClient | ClusterClient) -> RedisTransport:
    """The transport of a synchronous client: a cluster client's, or a plain one's."""
    if is_cluster(client):
        return ClusterTransport(client)  # type: ignore[arg-type]
    return RedisTransport(client)  # type: ignore[arg-type]


def async_transport_for(client: AsyncRedisClient | AsyncClusterClient) -> AsyncRedisTransport:
    """The transport of an asyncio client: a cluster client's, or a plain one's."""
    if is_cluster(client):
        return AsyncClusterTransport(client)  # type: ignore[arg-type]
    return AsyncRedisTransport(client)  # type: ignore[arg-type]


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
    # Retry.get_retries() is redis-py 6's; before it, the count is its _retries.
    retries = (
        retry.get_retries() if hasattr(retry, "get_retries") else getattr(retry, "_retries", 0)
    )
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
