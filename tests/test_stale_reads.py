"""A stale-read checker: concurrent writers and read-through readers, under disruption.

Writers commit increments of counters; readers serve the counters through a cache kept in
Redis under alkey keys (a miss reads the database and stores the value). A read is stale
when it returns a version older than the newest one committed *before the read began*.

Writers and readers run both as threads of this process (sharing one token store, as the
threads of one application do) and as separate processes (each with its own engine, Redis
client, store and binding; see tests/stale_worker.py), so that the check also covers what
one process cannot know about another's commits. Each scenario must see no stale read and
a real hit rate -- except, right after a frozen server or a cut link, the cross-process
reads of the documented known bound, which are shown apart (see
``Scenario.cross_process_grace``); and, with the local token cache on
(``local_cache``), the reads in another process than the writer's that missed a commit
for less than the cache's bound (``Scenario.invalidation_bound``), also shown apart.

Redis is one server, or (``Scenario.deployment``) a primary and a replica behind Sentinel,
or a Redis Cluster of 3 primaries started for the scenario, which every worker reaches
through a ``RedisCluster`` client (the failover and resharding scenarios).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import queue
import select as select_module
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Any, Literal

import pytest
import redis
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from alkey.cdc import ChangeListener
from alkey.constants import GLOBAL_WRITE_TOKEN
from alkey.embedded import EmbeddedRedis
from alkey.identity import row_identifier, table_identifier
from alkey.localcache import LEASE
from alkey.testing import LatencyProxy
from alkey.tokens import RedisTokenStore

from .stale_worker import (
    COUNTERS,
    CRASH_COUNTER,
    LOSING,
    LOST,
    LOST_COUNTER,
    START_TIMEOUT,
    Counter,
    Data,
    Floor,
    ReadOrder,
    Role,
    StaleRead,
    Tally,
    WorkerSpec,
    checker_engine,
    create_schema,
    drop_schema,
    local_stats,
    open_app,
    redis_client,
    run_loop,
    run_process,
)
from .stale_worker import Base as StaleBase
from .support.cluster import NO_CLUSTER, LocalCluster, Node, key_slot
from .support.postgres import LogicalPostgres, postgres_binaries
from .support.replication import ReplicationGroup, replication_group, restart_from_snapshot

SECONDS = 3.0
#: The store options of the scenarios with the local token cache on.
LOCAL: Mapping[str, Any] = {"local_cache": 10_000}
#: How many writers and readers run as threads of the test, and as processes of their own.
THREADS: Mapping[Role, int] = {"writer": 1, "reader": 2}
PROCESSES: Mapping[Role, int] = {"writer": 1, "reader": 2}
OUTAGE = 0.8  # seconds
Deployment = Literal["single", "sentinel", "cluster"]


@dataclass(frozen=True)
class Link:
    """The Redis under test, and the proxy that every client of the checker goes through
    when the scenario needs one; or, for a replicated scenario, the primary of a group
    of servers, which every client finds through Sentinel; or a Redis Cluster, which
    every client discovers from one node's URL."""

    server: EmbeddedRedis
    proxy: LatencyProxy | None = None
    group: ReplicationGroup | None = None
    #: The run's floor, whose phase a scenario that loses writes sets.
    floor: Floor | None = None
    cluster: LocalCluster | None = None
    #: The URL every client is given instead of the deployment's own (a user of its own).
    given_url: str | None = None
    #: What the disruption measured, shown with the run's tally.
    observed: dict[str, object] = field(default_factory=dict)
    #: When (``time.monotonic()``) Redis lost the bumps of a scenario that loses some.
    lost_at: list[float] = field(default_factory=list)

    def writers_phase(self, phase: int) -> None:
        assert self.floor is not None
        self.floor.set_phase(phase)

    @property
    def url(self) -> str:
        if self.given_url is not None:
            return self.given_url
        if self.cluster is not None:
            return self.cluster.url
        if self.group is not None:
            return self.group.sentinel_url
        return self.proxy.url if self.proxy is not None else self.server.url


@dataclass(frozen=True)
class Scenario:
    """What happens to Redis a third into the run, and how the workers are set up for it.

    A new scenario is one more instance: ``through_proxy`` puts every client (threads and
    processes) behind a :class:`LatencyProxy` that ``disrupt`` can cut; ``store_options``
    are extra keyword arguments for every worker's ``RedisTokenStore`` (e.g.
    ``{"durable": True, "lease": 0.5}``); ``kill_writer_process_after`` makes the writer
    processes SIGKILL themselves between their Nth database COMMIT and alkey's bump.
    """

    name: str
    disrupt: Callable[[Link], None]
    through_proxy: bool = False
    store_options: Mapping[str, Any] = field(default_factory=dict)
    kill_writer_process_after: int | None = None
    #: Seconds after the disruption ends during which a reader in another process than
    #: the writer may still read a version from before the write: the documented known bound
    #: for a process that saw no error itself (its request was merely held up until the
    #: link came back), so it cannot know that others owe Redis bumps; they replay them
    #: within ``retry_interval`` plus a socket timeout. Such reads are counted apart and
    #: shown; any other stale read fails the test. None: none is excused.
    cross_process_grace: float | None = None
    #: A counter that :attr:`cross_process_grace` never excuses: in the scenarios where
    #: Redis loses acknowledged bumps, the counter whose bumps are lost. The disruption
    #: there is also an outage (a crash and a restart, a failover), so a writer may owe
    #: Redis the bumps of other counters it committed meanwhile, within the same known
    #: bound as any outage; but no commit of the lost counter is under way then, and a
    #: stale read of it can only be a revert that alkey failed to notice.
    never_excused: int | None = None
    #: Durable mode's bound for a writer killed between COMMIT and bump: a read may miss
    #: its write (to :data:`CRASH_COUNTER`, which no other commit writes) for at most this
    #: many seconds after that COMMIT (about 1.5 leases).
    crash_bound: float | None = None
    #: How readers order loading a row and building its key.
    read_order: ReadOrder = "key_first"
    #: What readers serve: counters, a part the database cascades to, a tenant's counter.
    data: Data = "counters"
    #: Seconds a writer waits between commits. A cascade changes every key of the child
    #: table (which rows is never reported), so its scenarios write less often, as an
    #: application whose children are read far more often than their parents are written.
    writer_pause: float = 0.002
    #: What Redis is: one server, or a primary and a replica (replicating through a
    #: proxy that ``disrupt`` can cut) watched by a sentinel, with every client
    #: configured by the Sentinel URL; or a Redis Cluster of 3 primaries, each with
    #: ``cluster_replicas`` replicas, started for the scenario.
    deployment: Deployment = "single"
    cluster_replicas: int = 0
    #: With the local token cache on (``store_options={"local_cache": ...}``): seconds
    #: after the return of each commit it missed during which a read in another process
    #: than every such commit's writer may still miss it -- the cache's stated bound: a
    #: token is used until Redis's invalidation reaches the process, and never once no
    #: ping sent on the tracking connection within ``alkey.localcache.LEASE`` was
    #: answered. A read that missed a commit of its own process (whose bumps evict at once) is never
    #: excused, nor, after Redis lost them, one of :attr:`never_excused` (a revert).
    #: Such reads are counted apart and shown. None: none is excused.
    invalidation_bound: float | None = None
    #: Writers that do not use alkey (another service, ``psql``) on a PostgreSQL with
    #: logical decoding, and ``alkey listen``'s :class:`~alkey.cdc.ChangeListener`
    #: bumping for them: seconds after a commit returned during which any read may still
    #: miss it -- the listener's documented lag. None: writers use alkey.
    outside_lag: float | None = None
    #: The proxy of a scenario ``through_proxy``.
    proxy: Callable[[int], LatencyProxy] = LatencyProxy

    def __str__(self) -> str:
        return self.name

    def excuses(self, stale: StaleRead, run: Run) -> bool:
        """Whether ``stale`` is within this scenario's known bound."""
        return self.excuse(stale, run) is not None

    def excuse(self, stale: StaleRead, run: Run) -> Excuse | None:
        """Which of this scenario's known bounds ``stale`` is within, if any."""
        if self.crash_bound is not None and stale.counter == CRASH_COUNTER:
            within = stale.began - stale.committed.at <= self.crash_bound
            return "crash" if within else None
        lateness = stale.lateness
        if self.outside_lag is not None and lateness is not None and lateness <= self.outside_lag:
            return "lag"
        if (
            self.invalidation_bound is not None
            and lateness is not None
            and not stale.other_tenant
            and stale.missed_only_other_processes
            and lateness <= self.invalidation_bound
            and (
                stale.counter != self.never_excused
                or (run.lost_at is not None and stale.began < run.lost_at)
            )
        ):
            return "invalidation"
        if (
            self.cross_process_grace is not None
            and stale.counter != self.never_excused
            and stale.committed.pid != stale.reader_pid
            and run.disrupted <= stale.began <= run.restored + self.cross_process_grace
        ):
            return "outage"
        return None


#: Which known bound excuses a stale read: a crashed writer's (durable mode), an outage's
#: cross-process bound, the local token cache's invalidation bound, the change listener's
#: lag (writers outside the application).
Excuse = Literal["crash", "outage", "invalidation", "lag"]


@dataclass(frozen=True)
class Run:
    tally: Tally
    disrupted: float  # time.monotonic() when the disruption began
    restored: float  # and when it ended
    killed: int  # writer processes that died by SIGKILL, as told
    observed: Mapping[str, object] = field(default_factory=dict)  # by the disruption
    lost_at: float | None = None  # when Redis lost bumps, in a scenario that loses some


def nothing(link: Link) -> None:
    pass


def flushall(link: Link) -> None:
    client = redis.Redis.from_url(link.server.url)
    client.flushall()
    client.close()


def restart(link: Link) -> None:
    link.server.stop()
    time.sleep(0.3)
    link.server.start()


def freeze(link: Link) -> None:
    link.server.pause()  # a hung server: connections open, nothing answered
    time.sleep(OUTAGE)
    link.server.resume()


def cut(link: Link) -> None:
    assert link.proxy is not None, "a cut link needs the scenario's proxy"
    link.proxy.cut()  # open connections reset, new ones unanswered
    time.sleep(OUTAGE)
    link.proxy.restore()


#: How many times :func:`kill_tracking` kills the tracking connections, and how far apart:
#: the listeners reconnect within ``retry_interval`` (0.05 s) each time.
TRACKING_KILLS = 4
TRACKING_KILLS_APART = 0.2


def kill_tracking(link: Link) -> None:
    """``CLIENT KILL TYPE pubsub``, a few times: every local cache's tracking connection
    closed by the server (the only subscribed connections), while writers go on bumping
    through their own. Each listener hears it at once, empties its cache and reconnects."""
    client = redis.Redis.from_url(link.server.url)
    killed = []
    try:
        for kill in range(TRACKING_KILLS):
            if kill:
                time.sleep(TRACKING_KILLS_APART)
            killed.append(client.client_kill_filter(_type="pubsub"))
    finally:
        client.close()
    link.observed["tracking connections killed"] = killed
    assert all(killed), "every kill found tracking connections to kill"


class TrackingProxy(LatencyProxy):
    """A :class:`LatencyProxy` that can also silence the local caches' tracking
    connections alone (:meth:`silence_tracking`): from then on nothing is forwarded on
    them either way, and neither end hears of it -- a connection dead without a word (a
    partition, a half-open socket), while every other connection, the bumps' included,
    goes on as before. A tracking connection is one whose client sent ``CLIENT TRACKING``."""

    def __init__(self, target_port: int) -> None:
        self._tracking: set[socket.socket] = set()  # client ends of tracking connections
        self._silenced: set[socket.socket] = set()
        super().__init__(target_port)

    def silence_tracking(self) -> int:
        """Silence every tracking connection open now (for good: their listeners give up
        on them and make new ones, which are forwarded); how many."""
        with self._lock:
            self._silenced |= self._tracking
            return len(self._tracking)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if client in self._silenced:
                    time.sleep(0.05)  # nothing read, nothing sent, nothing reset
                    continue
                readable, _, _ = select_module.select([client, upstream], [], [], 0.05)
                for sock in readable:
                    if client in self._silenced:
                        break
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    if sock is client:
                        if b"TRACKING" in data:
                            with self._lock:
                                self._tracking.add(client)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                self._links.difference_update((client, upstream))
                self._tracking.discard(client)
                self._silenced.discard(client)
            client.close()
            upstream.close()


def silence_tracking(link: Link) -> None:
    """Every local cache's tracking connection goes silent (see :class:`TrackingProxy`)
    while writers go on bumping: the other processes' caches must stop serving within
    ``LEASE`` of the last ping Redis answered on it."""
    assert isinstance(link.proxy, TrackingProxy), "silencing needs the scenario's TrackingProxy"
    silenced = link.proxy.silence_tracking()
    link.observed["tracking connections silenced"] = silenced
    assert silenced, "no tracking connection to silence"


#: How long the primary acknowledges bumps that its replica or its snapshot will never
#: have, before it is lost (see :func:`lose_writes`).
UNREPLICATED = 0.3
#: How long the writers' commits under way when their phase changes take to end (and, the
#: lost counter being left alone, its value to be cached under its key). A bump under way
#: when Redis dies would fail, be kept and replayed on the new Redis, and hide the revert.
SETTLE = 0.2


def lose_writes(link: Link, begin: Callable[[], None], end: Callable[[], None]) -> None:
    """Make Redis lose the bumps of :data:`LOST_COUNTER`, and only those, for certain.

    Writers first leave that counter alone until its value is cached under its current key
    (readers read every counter many times a second); then Redis starts losing writes
    (``begin``: replication cut, or a snapshot taken), and the writers write that counter
    alone for :data:`UNREPLICATED` seconds, each bump acknowledged; then they leave it
    alone again, and once the last such commit has ended, the writes are lost (``end``).
    What Redis serves afterwards is the counter's token from before those commits, and
    the value cached under it."""
    link.writers_phase(LOST)
    time.sleep(SETTLE)
    begin()
    link.writers_phase(LOSING)
    time.sleep(UNREPLICATED)
    link.writers_phase(LOST)
    time.sleep(SETTLE)
    link.lost_at.append(time.monotonic())
    end()


def sentinel_failover(link: Link) -> None:
    """Replication is cut, the primary acknowledges bumps, then dies (SIGKILL); Sentinel
    promotes the replica, which never had those bumps but has the values cached before."""
    group = link.group
    assert group is not None, "a failover needs the scenario's replication group"

    def end() -> None:
        group.kill_primary()
        group.wait_for_failover()

    lose_writes(link, group.cut_replication, end)


def snapshot_restart(link: Link) -> None:
    """``SAVE``, bumps acknowledged, then a crash (SIGKILL) and a restart that reads the
    snapshot back: Redis's default persistence losing its last writes, and bringing back
    the values cached before them."""

    def save() -> None:
        client = redis.Redis.from_url(link.server.url)
        client.save()
        client.close()

    lose_writes(link, save, lambda: restart_from_snapshot(link.server))


#: Bytes written to a cluster primary while its replica is stopped, so that what the
#: primary acknowledges next waits in the primary's memory (see :func:`hold_back_replica`).
BACKLOG = 8 << 20


def hold_back_replica(primary: Node, replica: Node, filler: str) -> None:
    """Make ``primary`` acknowledge writes that ``replica`` will never have if ``primary``
    dies: stop the replica (SIGSTOP), then write to the primary more than the kernel's
    socket buffers between them take. (A stopped replica alone loses nothing -- its kernel
    keeps receiving the stream and it reads it on SIGCONT; a cluster node cannot
    replicate through a proxy, its primary's address comes from the cluster bus.) From
    then on, the replication stream waits in the primary's output buffer for the replica,
    behind the filler: whatever the primary acknowledges is lost with it. ``filler``: a
    key that ``primary`` serves."""
    assert replica.pid is not None
    os.kill(replica.pid, signal.SIGSTOP)
    client = primary.client()
    try:
        for _ in range(8):
            client.set(filler, b"x" * BACKLOG)
            if unsent(client):
                return
        raise AssertionError("the replication stream never backed up in the primary")
    finally:
        client.close()


def served_by(cluster: LocalCluster, node: Node, name: str) -> str:
    """A key named ``<name>-<number>`` that ``node`` serves."""
    owners = cluster.slot_owners()
    for number in itertools.count():
        key = f"{name}-{number}"
        slot = key_slot(key)
        if any(first <= slot <= last and port == node.port for first, last, port in owners):
            return key
    raise AssertionError("unreachable")


def unsent(primary: redis.Redis) -> int:
    """Bytes of the replication stream that ``primary`` keeps for its replica, unsent."""
    return sum(int(replica["omem"]) for replica in primary.client_list(_type="replica"))


def cluster_failover(link: Link) -> None:
    """The primary that holds :data:`LOST_COUNTER`'s token acknowledges bumps its replica
    never gets, then dies (SIGKILL); the replica takes over after the cluster's node
    timeout, with the tokens from before those bumps and the values cached under them.
    Clients meet a dead node, then ``MOVED`` to the promoted replica. Keys must change,
    not revert."""
    cluster = link.cluster
    assert cluster is not None, "a cluster failover needs the scenario's cluster"
    token = row_identifier(Counter.__table__, LOST_COUNTER)
    slot = key_slot(token)
    victim = cluster.owner(slot)
    replica = cluster.replica_of(victim)
    assert replica.pid is not None
    replica_pid = replica.pid
    filler = served_by(cluster, victim, "alkey-stale-filler")

    def end() -> None:
        client = victim.client()
        try:
            acknowledged = int(client.info("replication")["master_repl_offset"])
            link.observed["unsent bytes"] = unsent(client)
            bumped = client.get(token)
        finally:
            client.close()
        try:
            cluster.kill(victim)
        finally:
            os.kill(replica_pid, signal.SIGCONT)
        started = time.monotonic()
        deadline = started + 20
        while True:
            with contextlib.suppress(redis.RedisError, LookupError):
                if cluster.owner(slot).port == replica.port:
                    break
            assert time.monotonic() < deadline, "the replica never took over"
            time.sleep(0.05)
        link.observed["failover seconds"] = round(time.monotonic() - started, 2)
        client = replica.client()
        try:
            # Where the promoted replica's history left the dead primary's.
            diverged = int(client.info("replication")["second_repl_offset"]) - 1
            reverted = client.get(token)
        finally:
            client.close()
        link.observed["lost bytes"] = acknowledged - diverged
        # Else the run would prove nothing about keys that must not revert.
        assert acknowledged > diverged, "the promoted replica had every acknowledged write"
        assert reverted is not None, "the lost counter's token was never replicated"
        assert reverted != bumped, "the promoted replica had the lost counter's last bump"

    try:
        lose_writes(link, lambda: hold_back_replica(victim, replica, filler), end)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(replica_pid, signal.SIGCONT)


#: How long a moved token's slot stays migrating, its clients answered ASK.
ASKING_WINDOW = 0.1


def pause_after_each_batch() -> Callable[[], None]:
    """``between`` for :meth:`LocalCluster.migrate_slot`, which calls it before each batch
    of keys and once after the last: no pause before the first, :data:`ASKING_WINDOW`
    after each."""
    calls = itertools.count()

    def between() -> None:
        if next(calls):
            time.sleep(ASKING_WINDOW)

    return between


def cluster_resharding(link: Link) -> None:
    """The slots of every token the checker's keys and commits use (each counter's, the
    table's, the global one) move, one after another, to another primary, key by key as
    ``redis-cli --cluster reshard`` moves them: clients meet ``ASK`` while a slot moves,
    ``MOVED`` after. (A token that moves is served with its new node's epoch: its keys
    change once, a miss.)"""
    cluster = link.cluster
    assert cluster is not None, "resharding needs the scenario's cluster"
    identifiers = [
        *(row_identifier(Counter.__table__, index) for index in range(COUNTERS)),
        table_identifier(Counter.__table__),
        GLOBAL_WRITE_TOKEN,
    ]
    slots = sorted({key_slot(identifier) for identifier in identifiers})
    for number, slot in enumerate(slots):
        primaries = cluster.primaries()
        source = cluster.owner(slot)
        others = [node for node in primaries if node.port != source.port]
        # Token by token, a pause after each (``between`` is called before each batch
        # too): clients asking for a token that has moved while its slot is still
        # migrating are answered ASK.
        cluster.migrate_slot(
            slot, others[number % len(others)], between=pause_after_each_batch(), batch=1
        )
    link.observed["slots moved"] = len(slots)
    redirections = {"ASK": 0, "MOVED": 0}
    for node in cluster.primaries():
        client = node.client()
        try:
            errors = client.info("errorstats")
        finally:
            client.close()
        for redirection in redirections:
            redirections[redirection] += int(
                errors.get(f"errorstat_{redirection}", {}).get("count", 0)
            )
    link.observed.update(redirections)
    assert redirections["ASK"] > 0, "no client met a slot while it moved"
    assert redirections["MOVED"] > 0, "no client met a slot after it moved"


SCENARIOS = [
    Scenario("nothing", nothing),
    # Every writer is outside the application (no alkey); `alkey listen` bumps for them,
    # from a PostgreSQL with logical decoding that the test starts. A lag of up to a
    # second is excused (the guide's bound; measured p99 is tens of milliseconds).
    Scenario("outside_writer", nothing, outside_lag=1.0),
    Scenario("flushall", flushall),
    Scenario("restart", restart),
    # Both outages leave tokens in place, so the documented cross-process bound applies:
    # retry_interval 0.05 s + socket timeout 0.5 s, and a margin for a loaded machine.
    Scenario("frozen_redis", freeze, cross_process_grace=1.0),
    Scenario("cut_link", cut, through_proxy=True, cross_process_grace=1.0),
    # The writer process dies by SIGKILL between its 30th COMMIT and the bump; durable
    # mode's intents let the other workers apply that bump within 1.5 leases.
    Scenario(
        "killed_writer",
        nothing,
        store_options={"durable": True, "lease": 0.5},
        kill_writer_process_after=30,
        crash_bound=1.5 * 0.5 + 0.5,  # and a margin for a loaded machine
    ),
    # Readers load the counter, render, then key on the loaded instance: a commit between
    # load and key must not leave the old render under the key fresh readers build.
    Scenario("load_first", nothing, read_order="load_first"),
    # Readers serve, by identifier, a part of each counter that the database rewrites by
    # itself (ON UPDATE CASCADE from the counter's code). (Loading first is covered by
    # load_first: the loaded state alone would protect such readers.)
    Scenario("cascade", nothing, data="cascade", writer_pause=0.02),
    # Two tenants' counters, one schema each, with the same primary keys (PostgreSQL),
    # read by each tenant's identifier.
    Scenario("tenants", nothing, data="tenants"),
    # Bumps the primary acknowledged are lost with it: the promoted replica, and a Redis
    # restarted from its snapshot, hold tokens from before them (and the values cached
    # under their keys). Keys must change, not revert: no stale read of the lost counter
    # is excused. The crash is an outage too, with its cross-process bound for the other
    # counters, which writers go on writing through it.
    Scenario(
        "sentinel_failover",
        sentinel_failover,
        deployment="sentinel",
        cross_process_grace=1.0,
        never_excused=LOST_COUNTER,
    ),
    Scenario(
        "snapshot_restart", snapshot_restart, cross_process_grace=1.0, never_excused=LOST_COUNTER
    ),
    # The same on a Redis Cluster: the primary serving the lost counter's token loses
    # acknowledged bumps and dies; its replica takes over.
    Scenario(
        "cluster_failover",
        cluster_failover,
        deployment="cluster",
        cluster_replicas=1,
        cross_process_grace=1.0,
        never_excused=LOST_COUNTER,
    ),
    # The checker's token slots move between primaries while it runs.
    Scenario("cluster_resharding", cluster_resharding, deployment="cluster"),
    # The local token cache in every worker: keys whose tokens are all cached cost no
    # round trip, and Redis's invalidations (CLIENT TRACKING, BCAST) keep it current. A
    # read in another process than the writer's may miss a commit until the
    # invalidation reaches its process, and never for longer than LEASE; a process's own
    # commits evict at once.
    Scenario("local_cache", nothing, store_options=LOCAL, invalidation_bound=LEASE),
    # The tracking connections killed by the server, again and again: each listener
    # empties its cache and reconnects.
    Scenario(
        "local_cache_tracking_cut",
        kill_tracking,
        store_options=LOCAL,
        invalidation_bound=LEASE,
    ),
    # ... or silenced, their sockets left open: the caches must stop serving within LEASE
    # of the last ping answered, until their listeners give up and reconnect.
    Scenario(
        "local_cache_tracking_silenced",
        silence_tracking,
        through_proxy=True,
        proxy=TrackingProxy,
        store_options=LOCAL,
        invalidation_bound=LEASE,
    ),
    # Redis restarted, its data lost; and a failover that loses bumps, where both bounds
    # apply, and neither to the lost counter once its bumps are lost.
    Scenario("local_cache_restart", restart, store_options=LOCAL, invalidation_bound=LEASE),
    Scenario(
        "local_cache_sentinel_failover",
        sentinel_failover,
        deployment="sentinel",
        store_options=LOCAL,
        cross_process_grace=1.0,
        invalidation_bound=LEASE,
        never_excused=LOST_COUNTER,
    ),
    # The same on a Redis Cluster, a listener per primary.
    Scenario(
        "local_cache_cluster_failover",
        cluster_failover,
        deployment="cluster",
        cluster_replicas=1,
        store_options=LOCAL,
        cross_process_grace=1.0,
        invalidation_bound=LEASE,
        never_excused=LOST_COUNTER,
    ),
]


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@contextlib.contextmanager
def local_cluster(replicas: int) -> Iterator[LocalCluster]:
    """A Redis Cluster of 3 primaries, each with ``replicas`` replicas, for one run;
    skipping the test (with the reason) where no redis-server can run one."""
    if NO_CLUSTER is not None:
        pytest.skip(f"no Redis Cluster: {NO_CLUSTER}")
    with LocalCluster(3, replicas) as cluster:
        yield cluster


@pytest.fixture
def counters(engine: Engine) -> Iterator[Engine]:
    """The checker's own engine on the test database (SQLite enforcing foreign keys) and
    its tables, counters at version 0."""
    checker = checker_engine(engine.url.render_as_string(hide_password=False))
    create_schema(checker)
    yield checker
    drop_schema(checker)
    checker.dispose()


def run_outside_writers(server: EmbeddedRedis, scenario: Scenario, listening: bool = True) -> Run:
    """The checker on a PostgreSQL of its own with logical decoding, its writers without
    alkey, and a :class:`~alkey.cdc.ChangeListener` in this process bumping for them
    (unless not ``listening``: the control)."""
    if postgres_binaries() is None:
        pytest.skip("needs PostgreSQL's server programs (initdb)")
    with LogicalPostgres() as postgres:
        engine = checker_engine(postgres.url)
        create_schema(engine)
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        listener = ChangeListener(
            postgres.url,
            tokens=RedisTokenStore(client, retry_interval=0.05),
            metadata=StaleBase.metadata,
            poll_interval=0.01,
        )
        stop = threading.Event()
        try:
            listener.create()
            thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
            if listening:
                thread.start()
            try:
                return run_checker(engine, server, scenario, with_alkey=False)
            finally:
                stop.set()
                if listening:
                    thread.join(timeout=30)
        finally:
            listener.close()
            client.close()
            engine.dispose()


def run_checker(
    engine: Engine,
    server: EmbeddedRedis,
    scenario: Scenario,
    *,
    with_alkey: bool = True,
    group: ReplicationGroup | None = None,
    cluster: LocalCluster | None = None,
    url: str | None = None,
    deaf_local_cache: bool = False,
) -> Run:
    """Run the writers and readers for SECONDS, disrupting Redis a third of the way in.
    With a replication ``group``, ``server`` is its primary, and every client finds it
    through Sentinel. With a ``cluster``, every client is a cluster client given
    one node's URL, and ``server`` is unused. ``url``: what every client is given instead
    (the same servers, as another user). ``deaf_local_cache``: every worker's local token
    cache ignores Redis's invalidations (the control of the local cache's scenarios)."""
    context = multiprocessing.get_context("spawn")
    floor = Floor.create(context)
    start, stop = context.Event(), context.Event()
    results: multiprocessing.Queue[tuple[str, Tally | None]] = context.Queue()
    proxy = scenario.proxy(server.port) if scenario.through_proxy else None
    link = Link(server, proxy, group, floor, cluster, url)
    specs = [
        WorkerSpec(
            role,
            seed,
            engine.url.render_as_string(hide_password=False),
            link.url,
            with_alkey=with_alkey,
            store_options=scenario.store_options,
            kill_after_commits=scenario.kill_writer_process_after if role == "writer" else None,
            spare_crash_counter=scenario.kill_writer_process_after is not None,
            read_order=scenario.read_order,
            data=scenario.data,
            writer_pause=scenario.writer_pause,
            cluster=cluster is not None,
            deaf_local_cache=deaf_local_cache,
        )
        for role, count in PROCESSES.items()
        for seed in range(count)
    ]
    processes = [
        context.Process(target=run_process, args=(spec, floor, start, stop, results), daemon=True)
        for spec in specs
    ]
    for process in processes:
        process.start()
    tally = Tally()
    try:
        with open_app(
            engine,
            link.url,
            with_alkey=with_alkey,
            store_options=scenario.store_options,
            data=scenario.data,
            cluster=cluster is not None,
            deaf_local_cache=deaf_local_cache,
        ) as app:
            wait_until_ready(results, len(specs))
            thread_tallies: list[Tally] = []

            def work(role: Role, seed: int) -> None:
                thread_tallies.append(
                    run_loop(
                        f"{role} thread {seed}",
                        role,
                        app,
                        floor,
                        stop,
                        seed,
                        spare_crash_counter=scenario.kill_writer_process_after is not None,
                        read_order=scenario.read_order,
                        writer_pause=scenario.writer_pause,
                    )
                )

            threads = [
                threading.Thread(target=work, args=(role, 100 + seed))
                for role, count in THREADS.items()
                for seed in range(count)
            ]
            start.set()
            for thread in threads:
                thread.start()
            time.sleep(SECONDS / 3)
            disrupted = time.monotonic()
            scenario.disrupt(link)
            restored = time.monotonic()
            time.sleep(SECONDS * 2 / 3)
            if scenario.crash_bound is not None:
                # Run on until the bound is well past the dying commit, however late a
                # loaded machine let the writer reach it: only then does a run tell a
                # bump that came within the bound from one that never came.
                deadline = time.monotonic() + START_TIMEOUT
                while time.monotonic() < deadline:
                    crashed = floor.sample(CRASH_COUNTER).at
                    if crashed and time.monotonic() > crashed + scenario.crash_bound + 1.0:
                        break
                    time.sleep(0.05)
            stop.set()
            for thread in threads:
                thread.join()
            tally.local += local_stats(app, "the test's threads")
        for thread_tally in thread_tallies:
            tally.add(thread_tally)
        process_tally, killed = collect(results, specs, processes)
        tally.add(process_tally)
    finally:
        start.set()
        stop.set()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():  # pragma: no cover - collect() already reported it
                process.kill()
                process.join()
        if link.proxy is not None:
            link.proxy.close()
    lost_at = link.lost_at[0] if link.lost_at else None
    return Run(tally, disrupted, restored, killed, link.observed, lost_at)


def wait_until_ready(results: multiprocessing.Queue[tuple[str, Tally | None]], count: int) -> None:
    """Wait until ``count`` worker processes have connected (spawning takes a while), so
    that every worker runs when Redis is disrupted."""
    deadline = time.monotonic() + START_TIMEOUT
    while count:
        name, tally = results.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert tally is None or tally.errors == [], f"{name} failed to start: {tally}"
        count -= 1


def collect(
    results: multiprocessing.Queue[tuple[str, Tally | None]],
    specs: Sequence[WorkerSpec],
    processes: Sequence[SpawnProcess],
) -> tuple[Tally, int]:
    """The processes' tallies added up, and how many writers SIGKILLed themselves as told.
    Any other process that died without a tally is an error."""
    tally = Tally()
    pending = {spec.name: (spec, process) for spec, process in zip(specs, processes, strict=True)}
    deadline = time.monotonic() + 30
    while pending:
        # Checked before waiting: what an ended process sent is in the pipe already.
        alive = any(process.is_alive() for _, process in pending.values())
        try:
            name, process_tally = results.get(timeout=0.5)
        except queue.Empty:
            if alive and time.monotonic() < deadline:
                continue
            break
        assert process_tally is not None
        tally.add(process_tally)
        del pending[name]
    killed = 0
    for name, (spec, process) in pending.items():
        if process.exitcode == -signal.SIGKILL and spec.kill_after_commits is not None:
            killed += 1
        else:
            tally.errors.append(f"{name} sent no tally (exit code {process.exitcode})")
    return tally, killed


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_no_read_is_ever_staler_than_the_last_committed_write(
    counters: Engine, private_redis: EmbeddedRedis, scenario: Scenario
) -> None:
    if scenario.data.startswith("tenants") and counters.dialect.name != "postgresql":
        pytest.skip("a schema per tenant needs PostgreSQL")
    if scenario.outside_lag is not None:
        run = run_outside_writers(private_redis, scenario)
    elif scenario.deployment == "sentinel":
        with replication_group(replicas=1, sentinels=1, through_proxy=True) as group:
            run = run_checker(counters, group.primary, scenario, group=group)
    elif scenario.deployment == "cluster":
        with local_cluster(scenario.cluster_replicas) as cluster:
            run = run_checker(counters, private_redis, scenario, cluster=cluster)
    else:
        run = run_checker(counters, private_redis, scenario)
    tally = run.tally
    excused: dict[Excuse, list[StaleRead]] = {}
    unexcused = []
    for stale in tally.stale:
        excuse = scenario.excuse(stale, run)
        if excuse is None:
            unexcused.append(str(stale))
        else:
            excused.setdefault(excuse, []).append(stale)
    print(
        f"\n{scenario}: {tally.reads} reads, hit rate {tally.hit_rate:.0%}, "
        f"{len(unexcused)} stale; {tally.commits} commits, {tally.lock_timeouts} lock timeouts"
        + f"; disruption {run.restored - run.disrupted:.2f} s"
        + "".join(f"; {what} {value}" for what, value in run.observed.items())
    )
    for excuse, reads in excused.items():
        if excuse == "lag":
            lateness = sorted(stale.lateness or 0.0 for stale in reads)
            print(
                f"  and {len(reads)} stale within the change listener's lag: missed commits "
                f"returned {lateness[-1]:.3f} s before at most ({scenario.outside_lag:g} s "
                "allowed), e.g.\n" + "\n".join(f"  {stale}" for stale in reads[:3])
            )
            continue
        if excuse == "invalidation":
            lateness = sorted(stale.lateness or 0.0 for stale in reads)
            p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
            print(
                f"  and {len(reads)} stale in another process than the writer's, within the "
                f"local cache's bound: missed commits returned {lateness[-1]:.3f} s before "
                f"at most, p99 {p99:.3f} s ({scenario.invalidation_bound:g} s allowed), e.g.\n"
                + "\n".join(f"  {stale}" for stale in reads[:3])
            )
            continue
        if excuse == "crash":
            latest = max(stale.began - stale.committed.at for stale in reads)
            since, bound = "the missed COMMIT", scenario.crash_bound or 0.0
        else:
            latest = max(stale.began for stale in reads) - run.restored
            since, bound = "the outage ended", scenario.cross_process_grace or 0.0
        print(
            f"  and {len(reads)} stale in another process within the known bound, the "
            f"last {latest:.3f} s after {since} ({bound:g} s allowed), e.g.\n"
            + "\n".join(f"  {stale}" for stale in reads[:3])
        )
    for name, stats in tally.local:
        print(
            f"  local cache of {name}: {stats.hits} hits, {stats.misses} misses, "
            f"{stats.invalidations} invalidations, {stats.flushes} flushes"
        )
    assert tally.errors == []
    assert unexcused == []
    assert tally.reads > 100
    assert tally.hit_rate > 0.2, "the cache must actually serve reads"
    if scenario.kill_writer_process_after is not None:
        assert run.killed == PROCESSES["writer"], "every writer process died as told"
    if scenario.store_options.get("local_cache"):
        readers = [name for name, stats in tally.local if not name.startswith("writer")]
        with_hits = [name for name, stats in tally.local if stats.hits > 0]
        assert len(readers) == PROCESSES["reader"] + 1, "every reader's process has a cache"
        assert set(readers) <= set(with_hits), "every reader's local cache served keys"
    if scenario.disrupt is silence_tracking:
        # Not by chance: every commit of the second after the silence is missed by the
        # other processes, until their caches stop serving.
        assert excused.get("invalidation"), "the silenced caches served tokens of before"


def test_a_local_cache_deaf_to_invalidations_serves_stale_reads_past_its_bound(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``local_cache``: caches that ignore Redis's invalidations (their
    listeners still answered, so they keep serving) go on serving, in the processes that
    did not write, tokens from before commits long past the bound; a process's own commits
    still evict."""
    [local_cache] = [scenario for scenario in SCENARIOS if scenario.name == "local_cache"]
    run = run_checker(counters, private_redis, local_cache, deaf_local_cache=True)
    assert run.tally.errors == []
    late = [stale for stale in run.tally.stale if not local_cache.excuses(stale, run)]
    print(f"\ndeaf local caches: {len(late)} stale past the bound of {run.tally.reads} reads")
    assert late, "the deaf caches serve keys from before the commits"
    assert all(stale.missed_only_other_processes for stale in late)


def test_without_durable_mode_the_killed_writers_commit_stays_stale_past_the_bound(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``killed_writer``: the same run without durable mode must fail it."""
    [killed_writer] = [scenario for scenario in SCENARIOS if scenario.crash_bound is not None]
    control = dataclasses.replace(killed_writer, store_options={})
    run = run_checker(counters, private_redis, control)
    assert run.killed == PROCESSES["writer"]
    assert [stale for stale in run.tally.stale if not killed_writer.excuses(stale, run)], (
        "the missed bump leaves the crash counter stale past durable mode's bound"
    )


def test_without_the_epoch_a_cluster_failover_serves_values_from_before_the_lost_bumps(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``cluster_failover``: clients whose ACL hides ``INFO`` get tokens
    without an epoch, and the promoted replica's tokens bring back the keys, and the
    values cached under them, from before the bumps its primary lost."""
    [failover] = [scenario for scenario in SCENARIOS if scenario.name == "cluster_failover"]
    with local_cluster(failover.cluster_replicas) as cluster:
        for node in cluster.nodes:  # not replicated: every node, the replicas too
            client = node.client()
            try:
                client.acl_setuser(
                    "blind",
                    enabled=True,
                    passwords=["+blind"],
                    keys=["~*"],
                    channels=["&*"],
                    commands=["+@all", "-info"],
                )
            finally:
                client.close()
        url = f"redis://blind:blind@127.0.0.1:{cluster.nodes[0].port}/0"
        run = run_checker(counters, private_redis, failover, cluster=cluster, url=url)
    print(f"\nwithout the epoch: {len(run.tally.stale)} stale of {run.tally.reads} reads")
    assert run.tally.errors == []
    reverted = [stale for stale in run.tally.stale if stale.counter == LOST_COUNTER]
    assert reverted, "the reverted token's key serves the value cached before"


def test_without_the_epoch_a_restart_from_a_snapshot_serves_values_from_before_the_lost_bumps(
    counters: Engine,
) -> None:
    """The control of ``snapshot_restart``: clients whose ACL hides ``INFO`` (a user the
    server is started with, so that it survives the restart) get tokens without an
    epoch, and the snapshot's tokens bring back the keys, and the values cached under
    them, from before the bumps it missed."""
    [restart] = [scenario for scenario in SCENARIOS if scenario.name == "snapshot_restart"]
    blind = ("--user", "blind", "on", ">blind", "~*", "&*", "+@all", "-info")
    with EmbeddedRedis(extra_args=blind) as server:
        url = f"redis://blind:blind@127.0.0.1:{server.port}/0"
        run = run_checker(counters, server, restart, url=url)
    print(f"\nwithout the epoch: {len(run.tally.stale)} stale of {run.tally.reads} reads")
    assert run.tally.errors == []
    reverted = [stale for stale in run.tally.stale if stale.counter == LOST_COUNTER]
    assert reverted, "the restored token's key serves the value cached before"


def test_readers_that_load_then_key_by_identifier_cache_stale_renders(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``load_first``: keyed by identifier, which carries no loaded state, a
    render loaded before a commit is cached under the key built after its bump."""
    [load_first] = [scenario for scenario in SCENARIOS if scenario.name == "load_first"]
    control = dataclasses.replace(load_first, read_order="load_first_by_identifier")
    # A race that a short run misses about once in four: up to three runs to see it.
    for _ in range(3):
        tally = run_checker(counters, private_redis, control).tally
        assert tally.errors == []
        if tally.stale:
            break
    assert tally.stale, "a load that races a commit caches the old value under the new key"


def test_a_cascade_the_metadata_does_not_declare_leaves_stale_reads(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``cascade``: the same foreign key, known only to the database."""
    [cascade] = [scenario for scenario in SCENARIOS if scenario.name == "cascade"]
    tally = run_checker(
        counters, private_redis, dataclasses.replace(cascade, data="undeclared_cascade")
    ).tally
    assert tally.errors == []
    assert tally.stale, "the parts the database rewrote are served stale"


def test_tenants_keyed_by_the_mapped_tables_identifier_serve_each_other(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The control of ``tenants``: one identifier for both tenants' rows mixes them up."""
    if counters.dialect.name != "postgresql":
        pytest.skip("a schema per tenant needs PostgreSQL")
    [tenants] = [scenario for scenario in SCENARIOS if scenario.name == "tenants"]
    tally = run_checker(
        counters, private_redis, dataclasses.replace(tenants, data="tenants_shared")
    ).tally
    assert tally.errors == []
    assert any(stale.other_tenant for stale in tally.stale)


def test_the_checker_sees_stale_reads_when_nothing_invalidates(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    tally = run_checker(counters, private_redis, SCENARIOS[0], with_alkey=False).tally
    assert tally.errors == []
    assert tally.stale, "without alkey's bumps, cached counters go stale"


def test_outside_writers_without_the_listener_leave_reads_staler_than_its_lag(
    private_redis: EmbeddedRedis,
) -> None:
    """The control of ``outside_writer``: the same writers with no listener running serve
    reads that miss commits by more than the lag the scenario excuses."""
    [outside] = [scenario for scenario in SCENARIOS if scenario.name == "outside_writer"]
    run = run_outside_writers(private_redis, outside, listening=False)
    assert run.tally.errors == []
    late = [s for s in run.tally.stale if outside.excuse(s, run) is None]
    assert late, "without the listener, outside writes leave cached counters stale"


def test_a_writer_process_told_to_die_is_killed_between_its_commit_and_the_bump(
    counters: Engine, private_redis: EmbeddedRedis
) -> None:
    """The harness of a crashed-writer scenario (``kill_writer_process_after``) must kill at
    exactly that point: the version committed and published, no token bumped."""
    context = multiprocessing.get_context("spawn")
    floor = Floor.create(context)
    start, stop = context.Event(), context.Event()
    results: multiprocessing.Queue[tuple[str, Tally | None]] = context.Queue()
    identifiers = [row_identifier(Counter.__table__, index) for index in range(COUNTERS)]
    client = redis_client(private_redis.url)
    with open_app(counters, private_redis.url) as app:
        app.key_generator(*identifiers)  # creates every token the writer would bump
    keyspace_before = {key: client.get(key) for key in client.scan_iter()}
    spec = WorkerSpec(
        "writer",
        0,
        counters.url.render_as_string(hide_password=False),
        private_redis.url,
        kill_after_commits=1,
    )
    process = context.Process(
        target=run_process, args=(spec, floor, start, stop, results), daemon=True
    )
    process.start()
    wait_until_ready(results, 1)
    start.set()
    process.join(timeout=30)
    stop.set()
    with Session(counters) as session:
        versions = {counter.id: counter.version for counter in session.scalars(select(Counter))}
    committed = {index: floor.sample(index).version for index in range(COUNTERS)}
    keyspace_after = {key: client.get(key) for key in client.scan_iter()}
    client.close()
    assert process.exitcode == -signal.SIGKILL
    assert sorted(versions.values()) == [0] * (COUNTERS - 1) + [1], "one commit"
    assert committed == versions, "published"
    assert keyspace_after == keyspace_before, "not bumped"
