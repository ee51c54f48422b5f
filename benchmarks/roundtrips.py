"""Measuring Redis round trips: by counting them, and by adding network latency.

* :class:`CountingConnection` counts every request the client writes: one per command,
  one per pipeline. That is the number of round trips, exactly and deterministically.
* :class:`LatencyProxy` forwards TCP to Redis and delays every request by a fixed time,
  so that elapsed time / latency cross-checks the count, and shows what a network costs.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

import redis


class CountingConnection(redis.Connection):
    """A redis-py connection that counts the requests it sends (its round trips)."""

    requests = 0
    _lock = threading.Lock()

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        with CountingConnection._lock:
            CountingConnection.requests += 1
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


def counting_client(url: str) -> redis.Redis:
    """A client whose round trips show in ``CountingConnection.requests``, connected."""
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    client.ping()  # connect now, so the handshake is not counted later
    return client


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
    """

    def __init__(self, target_port: int, latency: float) -> None:
        self.target_port = target_port
        self.latency = latency
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

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
                            time.sleep(self.latency)
                        awaiting_reply = True
                        upstream.sendall(data)
                    else:
                        awaiting_reply = False
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
