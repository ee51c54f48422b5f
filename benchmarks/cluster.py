"""What a key and a commit cost on a Redis Cluster, with latency added on the way to each node.

    python -m benchmarks.cluster              # about a minute: writes docs/cluster.md, .png
    python -m benchmarks.cluster --no-write   # the same, printed only
    python -m benchmarks.cluster --smoke      # seconds: fails if a call is not one parallel
                                              # round trip per node (skips without Redis 7)

A cluster of three primaries (``tests.support.cluster.LocalCluster``) runs here, each node
behind a :class:`~alkey.testing.LatencyProxy` that delays every request by the given
latency; the cluster clients reach the nodes through the proxies (``address_remap``). For
comparison, one redis-server behind a proxy of the same latency. Each call names rows
spread over the three nodes by hash slot. Requests are counted on the connections (one
per node a call touches); times are medians of repeats in which the three stores take
turns (so drift hits all alike), noisy on shared machines: the ratios are what to read.

What to read: with L ms per request, a fetch or bump over three nodes should take about L
(the nodes are asked at once), like one Redis -- not 3 L, which asking them in turn costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis
from tests.support.cluster import (
    NO_CLUSTER,
    LocalCluster,
    async_cluster_client,
    cluster_client,
    nodes_of,
)

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis
from alkey.testing import LatencyProxy, RoundTrips, counting_client
from alkey.tokens import RedisTokenStore

DOCS = Path(__file__).resolve().parent.parent / "docs"

Remap = Callable[[tuple[str, int]], tuple[str, int]]
Call = Callable[[list[str]], object]

STORES = ("one Redis", "cluster", "cluster, asyncio")
CALLS = ("key", "commit's bump")

#: The full run: added latencies (ms), rows per call, timed repeats of each call.
LATENCIES_MS = [0.0, 1.0, 2.0, 5.0, 10.0]
SIZES = [1, 10, 100, 1000]
REPEAT = 25
#: The smoke: one latency well above the client's CPU time, one size over all nodes.
SMOKE_LATENCY_MS, SMOKE_SIZES, SMOKE_REPEAT = 20.0, [30], 5
#: The rows the plot shows.
PLOT_SIZE = 100


@dataclass
class Sample:
    """One call of one store at one latency and size: its requests and timed repeats."""

    nodes: int
    requests: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1000

    def quartiles_ms(self) -> tuple[float, float]:
        if len(self.seconds) < 2:
            return self.median_ms, self.median_ms
        first, _, third = statistics.quantiles(self.seconds, n=4)
        return first * 1000, third * 1000

    @property
    def spread(self) -> float:
        """The interquartile range as a fraction of the median."""
        first, third = self.quartiles_ms()
        return (third - first) / self.median_ms


#: (added latency in ms, store, call, rows) -> sample.
Results = dict[tuple[float, str, str, int], Sample]


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


def rows(count: int) -> list[str]:
    return [f"alkey:bench_items#{n}" for n in range(count)]


def requests_of(call: Callable[[], object]) -> int:
    """The requests one call sends (after a first call has created its tokens)."""
    call()
    with RoundTrips() as trips:
        call()
    return trips.count


def measure(
    cluster: LocalCluster,
    server: EmbeddedRedis,
    latency_ms: float,
    sizes: list[int],
    repeat: int,
    results: Results,
) -> None:
    """Every store's fetch and bump of each size at one latency, into ``results``."""
    loop = asyncio.new_event_loop()
    latency = latency_ms / 1000
    with proxied(cluster, latency) as remap, LatencyProxy(server.port, latency) as single:
        sync_client = cluster_client(cluster.url, remap=remap)
        async_client = loop.run_until_complete(async_cluster_client(cluster.url, remap=remap))
        plain = counting_client(single.url, socket_timeout=2)
        plain_store = RedisTokenStore(plain)
        sync_store, async_store = RedisTokenStore(sync_client), AsyncRedisTokenStore(async_client)
        calls: dict[str, tuple[Call, Call]] = {
            "one Redis": (plain_store.fetch, plain_store.bump),
            "cluster": (sync_store.fetch, sync_store.bump),
            "cluster, asyncio": (
                lambda ids: loop.run_until_complete(async_store.afetch(ids)),
                lambda ids: loop.run_until_complete(async_store.abump(ids)),
            ),
        }
        prefix = sync_store.options.key_prefix
        try:
            for size in sizes:
                identifiers = rows(size)
                spread = nodes_of(sync_client, identifiers, prefix)
                turns: list[tuple[Call, Sample]] = []
                for store, pair in calls.items():
                    for label, call in zip(CALLS, pair, strict=True):
                        requests = requests_of(partial(call, identifiers))
                        sample = Sample(1 if store == "one Redis" else spread, requests)
                        results[(latency_ms, store, label, size)] = sample
                        turns.append((call, sample))
                for round_number in range(repeat):  # take turns, starting with each in turn
                    shift = round_number % len(turns)
                    for call, sample in turns[shift:] + turns[:shift]:
                        started = time.perf_counter()
                        call(identifiers)
                        sample.seconds.append(time.perf_counter() - started)
        finally:
            sync_client.close()
            plain.close()
            loop.run_until_complete(async_client.aclose())
            loop.close()


def ratio(results: Results, latency_ms: float, store: str, label: str, size: int) -> float:
    one = results[(latency_ms, "one Redis", label, size)].median_ms
    return results[(latency_ms, store, label, size)].median_ms / one


def report(results: Results, latencies: list[float], sizes: list[int]) -> str:
    lines = [
        "| added latency | call | rows | nodes | requests: one Redis / cluster / asyncio "
        "| ms: one Redis | ms: cluster | ms: asyncio | cluster ÷ one Redis "
        "| asyncio ÷ one Redis | spread: one Redis / cluster / asyncio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for latency_ms in latencies:
        for label in CALLS:
            for size in sizes:
                samples = [results[(latency_ms, store, label, size)] for store in STORES]
                requests = " / ".join(str(s.requests) for s in samples)
                times = " | ".join(f"{s.median_ms:.2f}" for s in samples)
                ratios = " | ".join(
                    f"{ratio(results, latency_ms, store, label, size):.2f}" for store in STORES[1:]
                )
                spreads = " / ".join(f"{s.spread:.0%}" for s in samples)
                lines.append(
                    f"| {latency_ms:g} ms | {label} | {size} | {samples[1].nodes} | {requests} "
                    f"| {times} | {ratios} | {spreads} |"
                )
    return "\n".join(lines) + "\n"


def summary(results: Results, latencies: list[float], sizes: list[int]) -> str:
    """What to read, in a few lines: requests per node, the ratio where the latency
    dominates (the fewest rows over several nodes), and the client CPU per row."""
    cluster = [sample for (_, store, _, _), sample in results.items() if store != "one Redis"]
    lines = [
        "- Requests: "
        + (
            "every cluster call sent exactly one request per node it touched "
            f"(up to {max(s.nodes for s in cluster)}); one Redis, one."
            if all(s.requests == s.nodes for s in cluster)
            else "some cluster calls sent more requests than the nodes they touched: see the table."
        )
    ]
    nodes = {size: results[(latencies[0], "cluster", CALLS[0], size)].nodes for size in sizes}
    spread = [size for size in sizes if nodes[size] > 1]
    if spread:
        size = spread[0]
        parts = []
        for latency_ms in latencies:
            ratios = [
                ratio(results, latency_ms, store, label, size)
                for store in STORES[1:]
                for label in CALLS
            ]
            parts.append(f"{min(ratios):.2f} to {max(ratios):.2f} at {latency_ms:g} ms")
        lines.append(
            f"- Latency: with {size} rows over {nodes[size]} nodes, cluster ÷ one Redis "
            "(key and bump, sync and asyncio) is "
            + ", ".join(parts)
            + ": the nodes are asked at once, so the cluster pays the latency once, as one "
            "Redis does (asking them in turn would tend to 3 as the latency grows)."
        )
    if len(sizes) > 1 and 0 in latencies:
        small, large = sizes[-2], sizes[-1]
        per_row = {
            store: statistics.mean(
                (
                    results[(0.0, store, label, large)].median_ms
                    - results[(0.0, store, label, small)].median_ms
                )
                / (large - small)
                * 1000
                for label in CALLS
            )
            for store in STORES
        }
        lines.append(
            "- Client CPU: the keys of a call's rows lie in different hash slots, so on a "
            "cluster a call is one script call per slot (about one per row), pipelined into "
            "one request per node, where one Redis takes many rows per script call. Between "
            f"{small} and {large} rows at 0 ms that costs about "
            + ", ".join(f"{per_row[store]:.0f} µs per row for {store}" for store in STORES)
            + ": the ratio's excess at 100 rows and more is this, and it does not grow with "
            "the latency."
        )
    return "\n".join(lines)


def plot(results: Results, latencies: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    styles = {"one Redis": "-o", "cluster": "-s", "cluster, asyncio": "--^"}
    for axis, label in zip(axes, CALLS, strict=True):
        base = results[(latencies[0], "cluster", label, PLOT_SIZE)].median_ms
        for times, colour, what in ((1, "grey", "nodes at once"), (3, "firebrick", "in turn")):
            axis.plot(
                latencies,
                [base + times * (latency - latencies[0]) for latency in latencies],
                ":",
                color=colour,
                label=f"cluster at {latencies[0]:g} ms + {times} x latency ({what})",
            )
        for store, style in styles.items():
            samples = [results[(latency, store, label, PLOT_SIZE)] for latency in latencies]
            medians = [s.median_ms for s in samples]
            quartiles = [s.quartiles_ms() for s in samples]
            errors = [
                [m - q[0] for m, q in zip(medians, quartiles, strict=True)],
                [q[1] - m for m, q in zip(medians, quartiles, strict=True)],
            ]
            nodes = samples[0].nodes
            name = store if store == "one Redis" else f"{store} ({nodes} nodes)"
            axis.errorbar(latencies, medians, yerr=errors, fmt=style, capsize=3, label=name)
        axis.set_title(f"{label}, {PLOT_SIZE} rows")
        axis.set_xlabel("latency added per request (ms)")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("wall time per call (ms, median and quartiles)")
    axes[0].legend(fontsize="small")
    figure.suptitle("alkey on a 3-node Redis Cluster vs one Redis")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def check(results: Results, *, timing: bool) -> list[str]:
    """What breaks the promise: a request per node touched, and (``timing``: with a
    latency well above the client's CPU time) about one latency per call."""
    problems = []
    for (latency_ms, store, label, size), sample in results.items():
        what = f"{store}: {label} of {size} rows at {latency_ms:g} ms"
        if sample.requests != sample.nodes:
            problems.append(f"{what}: {sample.requests} requests for {sample.nodes} nodes")
        if timing and sample.median_ms > 1.8 * latency_ms:
            problems.append(f"{what}: {sample.median_ms:.1f} ms, over 1.8 x the added latency")
    return problems


def versions(executable: str) -> str:
    server = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, check=False
    ).stdout
    number = next((p[2:] for p in server.split() if p.startswith("v=")), "?")
    return f"redis-server {number}, redis-py {redis.__version__}"


def write_docs(
    results: Results, latencies: list[float], sizes: list[int], repeat: int, about: str
) -> None:
    DOCS.mkdir(exist_ok=True)
    table = report(results, latencies, sizes)
    (DOCS / "cluster.md").write_text(
        "# Redis Cluster: a key and a bump\n\n"
        "What a key's token fetch and a commit's bump cost on a local Redis Cluster of "
        "three primaries, each node behind a proxy that adds a fixed latency to every "
        "request, against one redis-server behind the same proxy. A call's rows are spread "
        "over the nodes by hash slot; the cluster stores (`RedisTokenStore` on "
        "`redis.RedisCluster`, `AsyncRedisTokenStore` on `redis.asyncio.RedisCluster`) "
        "send one request per node touched, all at once. Requests are counted on the "
        "connections.\n\n"
        "Reproduce with `.venv/bin/python -m benchmarks.cluster` (needs a Redis 7 "
        "`redis-server`; about a minute; `--no-write` only prints); `make bench-smoke` runs "
        "its `--smoke` check. This run: "
        f"{about}, {len(latencies)} latencies x {len(sizes)} sizes, {repeat} timed repeats "
        "of each call in which the stores take turns. Times are medians; the spread column "
        "is the interquartile range over the repeats as a share of the median. Absolute "
        "times are noisy on this 2-core machine: read the ratios and the request counts."
        "\n\n## What to read\n\n"
        + summary(results, latencies, sizes)
        + "\n\n![Wall time per call against added latency](cluster.png)\n\n## All results\n\n"
        + table,
        encoding="utf-8",
    )
    plot(results, latencies, DOCS / "cluster.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--smoke", action="store_true", help="one latency, one size: check")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--repeat", type=int, help="timed repeats of each call")
    args = parser.parse_args(argv)
    if NO_CLUSTER is not None:
        print(f"cluster benchmark skipped, no Redis Cluster here: {NO_CLUSTER}", file=sys.stderr)
        return 0 if args.smoke else 2
    latencies = [SMOKE_LATENCY_MS] if args.smoke else LATENCIES_MS
    sizes = SMOKE_SIZES if args.smoke else SIZES
    repeat = args.repeat or (SMOKE_REPEAT if args.smoke else REPEAT)
    results: Results = {}
    with LocalCluster(3, 0) as cluster, EmbeddedRedis() as server:
        about = versions(cluster.executable)
        for latency_ms in latencies:
            measure(cluster, server, latency_ms, sizes, repeat, results)
    print(summary(results, latencies, sizes), end="\n\n")
    print(report(results, latencies, sizes))
    if not (args.smoke or args.no_write):
        write_docs(results, latencies, sizes, repeat, about)
        print(f"wrote {DOCS / 'cluster.md'} and {DOCS / 'cluster.png'}")
    problems = check(results, timing=args.smoke)
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    if args.smoke and not problems:
        print("cluster smoke passed: one request per node touched, about one latency per call")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
