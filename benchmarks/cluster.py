"""What a key and a commit cost on a Redis Cluster, with latency added on the way to each node.

    python -m benchmarks.cluster            # the table (a minute)
    python -m benchmarks.cluster --smoke    # seconds: fails if a call is not one parallel
                                            # round trip per node

A cluster of three primaries (``tests.support.cluster.LocalCluster``) runs here, each node
behind a :class:`~alkey.testing.LatencyProxy` that delays every request by the given
latency; the cluster clients reach the nodes through the proxies (``address_remap``). For
comparison, one redis-server behind a proxy of the same latency. Each call names rows
spread over the three nodes. Requests are counted on the connections (one per node a
call touches); times are medians, noisy on shared machines.

What to read: with L ms per request, a fetch or bump over three nodes should take about L
(the nodes are asked at once), like one Redis -- not 3 L, which asking them in turn costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

from tests.support.cluster import LocalCluster, async_cluster_client, cluster_client

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis
from alkey.scripts import key_slot
from alkey.testing import LatencyProxy, RoundTrips, counting_client
from alkey.tokens import RedisTokenStore

Remap = Callable[[tuple[str, int]], tuple[str, int]]


@contextmanager
def proxied(cluster: LocalCluster, latency: float) -> Iterator[Remap]:
    """An ``address_remap`` that sends the clients through a proxy per node."""
    with ExitStack() as stack:
        proxies = {
            node.port: stack.enter_context(LatencyProxy(node.port, latency=latency))
            for node in cluster.nodes
        }

        def remap(address: tuple[str, int]) -> tuple[str, int]:
            proxy = proxies.get(address[1])
            return (address[0], proxy.port) if proxy is not None else address

        yield remap


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(requests per call, median seconds per call) of ``call``, warmed up first."""
    call()
    with RoundTrips() as trips:
        call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(trips.count), statistics.median(times)


def rows(count: int) -> list[str]:
    return [f"alkey:bench_items#{n}" for n in range(count)]


def nodes_touched(cluster: LocalCluster, identifiers: list[str]) -> int:
    return len({cluster.owner(key_slot(identifier)).port for identifier in identifiers})


def measure(
    cluster: LocalCluster, server: EmbeddedRedis, latency: float, sizes: list[int], repeat: int
) -> list[tuple[str, int, int, float, float]]:
    """(what, rows, nodes, requests, ms) for each call, store and size."""
    found: list[tuple[str, int, int, float, float]] = []
    loop = asyncio.new_event_loop()
    with proxied(cluster, latency) as remap, LatencyProxy(server.port, latency) as single:
        sync_client = cluster_client(cluster.url, remap=remap)
        async_client = loop.run_until_complete(async_cluster_client(cluster.url, remap=remap))
        plain = counting_client(single.url, socket_timeout=2)
        stores: dict[str, tuple[Callable[[list[str]], object], Callable[[list[str]], object]]]
        sync_store, async_store = RedisTokenStore(sync_client), AsyncRedisTokenStore(async_client)
        plain_store = RedisTokenStore(plain)
        stores = {
            "one Redis": (plain_store.fetch, plain_store.bump),
            "cluster": (sync_store.fetch, sync_store.bump),
            "cluster, asyncio": (
                lambda ids: loop.run_until_complete(async_store.afetch(ids)),
                lambda ids: loop.run_until_complete(async_store.abump(ids)),
            ),
        }
        try:
            for name, (fetch, bump) in stores.items():
                for size in sizes:
                    identifiers = rows(size)
                    nodes = 1 if name == "one Redis" else nodes_touched(cluster, identifiers)
                    for call, label in ((fetch, "key"), (bump, "commit's bump")):
                        requests, seconds = timed(partial(call, identifiers), repeat)
                        found.append((f"{name}: {label}", size, nodes, requests, seconds * 1000))
        finally:
            sync_client.close()
            plain.close()
            loop.run_until_complete(async_client.aclose())
            loop.close()
    return found


def report(latency: float, found: list[tuple[str, int, int, float, float]]) -> str:
    lines = [
        f"#### {latency * 1000:g} ms added per request",
        "",
        "| call | rows | nodes | requests | ms | ms / added latency |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for what, size, nodes, requests, ms in found:
        ratio = f"{ms / (latency * 1000):.2f}" if latency else "-"
        lines.append(f"| {what} | {size} | {nodes} | {requests:g} | {ms:.2f} | {ratio} |")
    return "\n".join(lines)


def check(
    latency: float, found: list[tuple[str, int, int, float, float]], *, timing: bool
) -> list[str]:
    """What breaks the promise: a request per node touched, and (``timing``: with a
    latency well above the client's CPU time) about one latency per call."""
    problems = []
    for what, size, nodes, requests, ms in found:
        if requests != nodes:
            problems.append(f"{what} of {size} rows: {requests:g} requests for {nodes} nodes")
        if timing and ms > 1.8 * latency * 1000:
            problems.append(f"{what} of {size} rows: {ms:.1f} ms, over 1.8 x the added latency")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one latency, small sizes: check")
    args = parser.parse_args(argv)
    latencies = [0.02] if args.smoke else [0.0, 0.001, 0.005]
    sizes = [30] if args.smoke else [1, 10, 100, 1000]
    repeat = 5 if args.smoke else 15
    problems: list[str] = []
    with LocalCluster(3, 0) as cluster, EmbeddedRedis() as server:
        for latency in latencies:
            found = measure(cluster, server, latency, sizes, repeat)
            print(report(latency, found), end="\n\n")
            problems += check(latency, found, timing=args.smoke)
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
