"""What Redis pays for client tracking: BCAST mode (alkey's listener) against default mode.

Part of ``python -m benchmarks.localcache`` (see there). One redis-server per mode, side
by side, each with K tracking clients (raw redis-py connections, each standing for one
process with the local cache on):

* **no tracking** -- K connections subscribed to ``__redis__:invalidate`` without
  tracking: the baseline;
* **BCAST** -- alkey's tracking connection, K times: ``CLIENT TRACKING ON REDIRECT <own
  id> BCAST PREFIX alkey:`` and the subscription (:func:`alkey.invalidations.tracking_commands`);
* **default** -- K subscribed connections, and K reading connections with ``CLIENT
  TRACKING ON REDIRECT <subscriber>`` without ``BCAST``: Redis remembers, per key, every
  client that read it since its last change, and tells only those;
* **default, 10% read** -- the same, each reader reading a tenth of the rows (a
  different tenth each): the case default mode is made for.

Every round, on every server in turn (the order rotating): K readers fetch their rows
with alkey's fetch script (keys of 100 rows, as a key of 100 instances does; on the
default servers this is what fills the tracking table), then one writer bumps every row
once, each bump shaped like a commit of one row (the row's token, its table's, the global
one). Measured on the server: its CPU (``INFO cpu``, user + system, which counts the
invalidations it writes out whenever it writes them) during the reads and during the
bumps, the tracking table (``tracking_total_keys``, ``tracking_total_items``) and the
memory the reads added (``used_memory``); on the clients: invalidation messages and bytes
received, drained by a thread as they come.
"""

from __future__ import annotations

import random
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from alkey.constants import GLOBAL_WRITE_TOKEN, UNKNOWN_WRITES
from alkey.embedded import EmbeddedRedis
from alkey.invalidations import CHANNEL, tracking_commands
from alkey.tokens import RedisTokenStore
from benchmarks.workload import TABLE

MODES = ("no tracking", "BCAST", "default", "default, 10% read")
#: Rows each reader of the "10% read" mode reads, as a share of all.
PARTIAL = 0.1
#: Rows per fetch: a key of this many instances (with its two unknown-writes tokens).
FETCH_ROWS = 100
#: The fewest fetches a round times (the readers' rows, read again as often as needed).
LEAST_FETCHES = 200


@dataclass(frozen=True)
class ServerPlan:
    clients: tuple[int, ...]
    rows: int
    rounds: int


FULL_SERVER = ServerPlan(clients=(1, 10, 50), rows=1000, rounds=9)


@dataclass
class Round:
    """One round on one server."""

    read_cpu: float
    fetches: int
    bump_cpu: float
    bumps: int
    messages: int
    received: int
    tracked_keys: int
    tracked_items: int
    table_memory: int


@dataclass
class Cost:
    """One mode with K tracking clients: its rounds."""

    mode: str
    clients: int
    rounds: list[Round] = field(default_factory=list)

    def median(self, value: Callable[[Round], float]) -> float:
        return statistics.median(value(r) for r in self.rounds)

    def bumps_us(self) -> list[float]:
        """Server CPU per bump in each round, in µs."""
        return [r.bump_cpu / r.bumps * 1e6 for r in self.rounds]

    @property
    def bump_us(self) -> float:
        return statistics.median(self.bumps_us())

    @property
    def fetch_us(self) -> float:
        return self.median(lambda r: r.read_cpu / r.fetches * 1e6)

    @property
    def messages(self) -> float:
        return self.median(lambda r: r.messages / r.bumps)

    @property
    def bytes_per_bump(self) -> float:
        return self.median(lambda r: r.received / r.bumps)

    @property
    def items(self) -> float:
        return self.median(lambda r: r.tracked_items)

    @property
    def keys(self) -> float:
        return self.median(lambda r: r.tracked_keys)

    @property
    def table_memory(self) -> float:
        return self.median(lambda r: r.table_memory)


class Drain(threading.Thread):
    """Reads every subscribed socket as data comes, counting bytes and messages."""

    PATTERN = CHANNEL.encode()

    def __init__(self, sockets: Sequence[socket.socket]) -> None:
        super().__init__(daemon=True, name="drain")
        self.selector = selectors.DefaultSelector()
        for sock in sockets:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, b"")
        self.received = 0
        self.messages = 0
        self.last = time.monotonic()
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        tails: dict[int, bytes] = {}
        keep = len(self.PATTERN) - 1
        while not self.done.is_set():
            for key, _ in self.selector.select(0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not data:
                    self.selector.unregister(sock)
                    continue
                seen = tails.get(sock.fileno(), b"") + data
                tails[sock.fileno()] = seen[-keep:]
                with self.lock:
                    self.received += len(data)
                    self.messages += seen.count(self.PATTERN)
                    self.last = time.monotonic()

    def take(self) -> tuple[int, int]:
        """Messages and bytes since the last take."""
        with self.lock:
            counts = (self.messages, self.received)
            self.messages = self.received = 0
        return counts

    def settle(self, quiet: float = 0.1, timeout: float = 30.0) -> None:
        """Wait until nothing came for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                idle = time.monotonic() - self.last
            if idle >= quiet:
                return
            time.sleep(quiet / 4)

    def close(self) -> None:
        self.done.set()
        self.join(5)
        self.selector.close()


def _connection(url: str) -> Any:
    """A raw RESP2 connection (redis-py's ``Connection``, untyped), connected."""
    options = redis.ConnectionPool.from_url(url).connection_kwargs
    factory: Any = redis.Connection
    connection = factory(**{**options, "protocol": 2})
    connection.connect()
    return connection


def _call(connection: Any, *command: str) -> Any:
    connection.send_command(*command)
    return connection.read_response()


class Side:
    """One server, one mode, K tracking clients: its readers, its writer, its drain."""

    def __init__(self, mode: str, server: EmbeddedRedis, clients: int, rows: int) -> None:
        self.mode = mode
        self.admin = redis.Redis.from_url(server.url, socket_timeout=30)
        self.subscribers: list[Any] = []
        self.readers: list[tuple[redis.Redis, RedisTokenStore]] = []
        self.rows = [f"{TABLE}{n}" for n in range(1, rows + 1)]
        for _ in range(clients):
            subscriber = _connection(server.url)
            own = int(_call(subscriber, "CLIENT", "ID"))
            if mode == "BCAST":
                for command in tracking_commands(own, ""):
                    reply = _call(subscriber, *command)
            else:
                reply = _call(subscriber, "SUBSCRIBE", CHANNEL)
            if not isinstance(reply, list) or reply[0] != b"subscribe":
                raise RuntimeError(f"{mode}: unexpected reply to SUBSCRIBE: {reply!r}")
            self.subscribers.append(subscriber)
            # One connection per reader, so its tracking applies to every fetch it makes.
            pool = redis.ConnectionPool.from_url(server.url, max_connections=1, socket_timeout=30)
            client = redis.Redis.from_pool(pool)
            if mode.startswith("default"):
                client.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "TRACKING", "ON", "REDIRECT", str(own)
                )
            self.readers.append((client, RedisTokenStore(client)))
        self.writer = RedisTokenStore(redis.Redis.from_url(server.url, socket_timeout=30))
        self.writer.fetch(self.rows)  # every token exists: reads write nothing
        self.drain = Drain([subscriber._sock for subscriber in self.subscribers])
        self.drain.start()

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.admin.execute_command(  # type: ignore[no-untyped-call]
            "INFO", "cpu", "stats", "memory"
        )
        return info

    @staticmethod
    def cpu(info: dict[str, Any]) -> float:
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def read_sets(self, number: int) -> list[list[str]]:
        """What each reader reads this round: every row, or a tenth of them."""
        if self.mode != "default, 10% read":
            return [self.rows for _ in self.readers]
        chooser = random.Random(number)
        count = max(1, round(len(self.rows) * PARTIAL))
        return [sorted(chooser.sample(self.rows, count)) for _ in self.readers]

    def round(self, number: int) -> Round:
        sets = self.read_sets(number)
        shared = [TABLE + "?", UNKNOWN_WRITES]
        calls = [
            (store, [*rows[start : start + FETCH_ROWS], *shared])
            for (_, store), rows in zip(self.readers, sets, strict=True)
            for start in range(0, len(rows), FETCH_ROWS)
        ]
        # Enough fetches that the INFO calls around them do not count.
        passes = -(-LEAST_FETCHES // len(calls))
        before = self.info()
        for _ in range(passes):
            for store, identifiers in calls:
                store.fetch(identifiers)
        read = self.info()
        fetches = passes * len(calls)
        self.drain.settle()
        self.drain.take()
        bump = self.writer.bump
        for name in self.rows:
            bump([name, TABLE + "*", GLOBAL_WRITE_TOKEN])
        self.drain.settle()
        after = self.info()
        messages, received = self.drain.take()
        return Round(
            read_cpu=self.cpu(read) - self.cpu(before),
            fetches=fetches,
            bump_cpu=self.cpu(after) - self.cpu(read),
            bumps=len(self.rows),
            messages=messages,
            received=received,
            tracked_keys=int(read["tracking_total_keys"]),
            tracked_items=int(read["tracking_total_items"]),
            table_memory=int(read["used_memory"]) - int(before["used_memory"]),
        )

    def close(self) -> None:
        self.drain.close()
        for subscriber in self.subscribers:
            subscriber.disconnect()
        for client, _ in self.readers:
            client.close()
        self.writer.client.close()
        self.admin.close()


def measure_server(plan: ServerPlan, progress: Callable[[str], None]) -> list[Cost]:
    """Every mode with every K, in rounds that rotate over the modes' servers."""
    costs: list[Cost] = []
    for clients in plan.clients:
        started = time.monotonic()
        with (
            EmbeddedRedis() as none,
            EmbeddedRedis() as bcast,
            EmbeddedRedis() as default,
            EmbeddedRedis() as partial,
        ):
            servers = dict(zip(MODES, (none, bcast, default, partial), strict=True))
            sides = [Side(mode, server, clients, plan.rows) for mode, server in servers.items()]
            found = {side.mode: Cost(side.mode, clients) for side in sides}
            try:
                for side in sides:  # warm: scripts loaded, tables at their steady size
                    side.round(0)
                for number in range(plan.rounds):
                    shift = number % len(sides)
                    order = sides[shift:] + sides[:shift]
                    if (number // len(sides)) % 2:
                        order.reverse()
                    for side in order:
                        found[side.mode].rounds.append(side.round(number + 1))
            finally:
                for side in sides:
                    side.close()
        costs.extend(found.values())
        progress(
            f"  server cost, {clients} tracking clients: {plan.rounds} rounds, "
            f"{time.monotonic() - started:.1f} s"
        )
    return costs
