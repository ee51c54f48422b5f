"""The lag of writes from outside the application: from a ``COMMIT`` to its bumped token.

    python -m benchmarks.cdc            # about a minute: docs/cdc.md and docs/cdc.png
    python -m benchmarks.cdc --smoke    # seconds: checks every commit was bumped

A PostgreSQL of its own with ``wal_level=logical`` (as the tests start one) and a Redis of
its own. A writer that does not use alkey -- raw psycopg, autocommit -- updates one row
per transaction at a steady rate (1,000 commits per second by default), each transaction
a row no other names, and notes ``time.monotonic()`` right after each ``COMMIT`` returns.
An :class:`alkey.cdc.ChangeListener` runs in a thread of the same process, with its
store's ``bump`` wrapped to note ``time.monotonic()`` right after each bump returns and
which rows it carried. The lag of a commit is the first such moment after its commit
returned, for its row: from then on, every key built from that row is new.

Reported per poll interval: the rate the writer reached, p50 / p99 / max of the lag, and
how many commits the listener bumped per round trip. Absolute times on a shared 2-core
machine are noisy; the poll interval bounds the lag of an idle listener, the decoding
query and the bump the rest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from tests.support.postgres import LogicalPostgres

from alkey.cdc import ChangeListener
from alkey.embedded import EmbeddedRedis
from alkey.identity import row_identifier
from alkey.tokens import RedisTokenStore

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: Rows the writer updates, one per commit, each once a run.
ROWS = 60_000


class TimedStore(RedisTokenStore):
    """A real store that notes when each bump returned and which rows it carried."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client, on_error="raise")
        self.bumped: list[tuple[float, Collection[str]]] = []
        self.round_trips = 0

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        super().bump(identifiers, intent)
        self.bumped.append((time.monotonic(), identifiers))
        self.round_trips += 1


@dataclass(frozen=True)
class Result:
    """One run: its poll interval, the writer's rate, and the lags."""

    poll_interval: float
    target_rate: float
    commits: int
    rate: float
    lags: list[float]
    round_trips: int

    def quantile(self, q: float) -> float:
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def write(dsn: str, first: int, count: int, rate: float) -> list[tuple[int, float]]:
    """Commit ``count`` one-row updates at ``rate`` per second; each row's commit time."""
    done: list[tuple[int, float]] = []
    with psycopg.connect(dsn, autocommit=True) as connection:
        began = time.monotonic()
        for n in range(count):
            due = began + n / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            row = first + n
            connection.execute("UPDATE items SET n = n + 1 WHERE id = %s", (row,))
            done.append((row, time.monotonic()))
    return done


def run_once(
    postgres: LogicalPostgres, client: redis.Redis, poll_interval: float, rate: float, count: int
) -> Result:
    dsn = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS items")
        connection.execute("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL)")
        connection.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, %s) g", (count,))
    store = TimedStore(client)
    with ChangeListener(postgres.url, tokens=store, poll_interval=poll_interval) as listener:
        listener.drop()
        listener.create()
        stop = threading.Event()
        thread = threading.Thread(target=listener.run, args=(stop,), daemon=True)
        thread.start()
        began = time.monotonic()
        commits = write(dsn, 1, count, rate)
        elapsed = time.monotonic() - began
        deadline = time.monotonic() + 30
        wanted = row_identifier("items", count)
        while not any(wanted in ids for _, ids in store.bumped):
            if time.monotonic() > deadline:
                raise SystemExit("the listener did not bump every commit within 30 s")
            time.sleep(0.01)
        stop.set()
        thread.join()
        listener.drop()
    first_bump: dict[str, float] = {}
    for moment, identifiers in store.bumped:
        for identifier in identifiers:
            first_bump.setdefault(identifier, moment)
    lags = []
    for row, committed in commits:
        bumped = first_bump.get(row_identifier("items", row))
        if bumped is None:
            raise SystemExit(f"row {row}'s commit was never bumped")
        lags.append(bumped - committed)
    return Result(poll_interval, rate, count, count / elapsed, lags, store.round_trips)


def table(results: list[Result]) -> str:
    lines = [
        "| poll interval | commits | target rate | rate reached | lag p50 | lag p99 | lag max "
        "| commits per bump |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.poll_interval * 1000:g} ms | {result.commits:,} "
            f"| {result.target_rate:,.0f}/s | {result.rate:,.0f}/s "
            f"| {result.quantile(0.5) * 1000:.1f} ms | {result.quantile(0.99) * 1000:.1f} ms "
            f"| {max(result.lags) * 1000:.1f} ms | {result.commits / result.round_trips:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for result in results:
        lags = sorted(lag * 1000 for lag in result.lags)
        share = [100 * (index + 1) / len(lags) for index in range(len(lags))]
        axis.plot(lags, share, label=f"poll interval {result.poll_interval * 1000:g} ms")
    axis.set_xlabel("ms from the COMMIT returning to its token bumped")
    axis.set_ylabel("% of commits")
    axis.set_title(f"alkey listen: lag under {results[0].target_rate:,.0f} commits/s")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cdc", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds; writes no docs")
    parser.add_argument("--rate", type=float, default=1000.0, help="commits per second")
    args = parser.parse_args(argv)
    count = 500 if args.smoke else 20_000
    intervals = [0.05] if args.smoke else [0.05, 0.01]
    with LogicalPostgres() as postgres, EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        results = [run_once(postgres, client, i, args.rate, count) for i in intervals]
        client.close()
    rendered = table(results)
    print(rendered)
    if args.smoke:
        print(f"every one of {count} outside commits was bumped")
        return 0
    header = (
        "# Benchmark: the lag of writes from outside the application\n\n"
        "Written by `make bench-cdc` (`python -m benchmarks.cdc`); see "
        "[Writes from outside the application](outside-writes.md).\n\n"
        "A writer that does not use alkey (raw psycopg, autocommit) updates one row per "
        "transaction at a steady rate, in a PostgreSQL of its own with `wal_level=logical`; "
        "`alkey listen`'s `ChangeListener` runs beside it. The lag of a commit is the time "
        "from its `COMMIT` returning to the return of the bump that carried its row. "
        f"Python {sys.version.split()[0]}, on a shared machine: absolute times are noisy.\n\n"
    )
    DOCS.mkdir(exist_ok=True)
    (DOCS / "cdc.md").write_text(header + rendered + "\n\n![lag](cdc.png)\n", encoding="utf-8")
    plot(results, DOCS / "cdc.png")
    print(f"wrote {DOCS / 'cdc.md'} and {DOCS / 'cdc.png'}")
    quantiles = [statistics.median(r.lags) for r in results]
    print("median lags:", ", ".join(f"{q * 1000:.1f} ms" for q in quantiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
