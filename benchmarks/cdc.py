"""The lag of writes from outside the application: from a ``COMMIT`` to its bumped token,
through logical decoding (``alkey listen``) and through the trigger outbox
(``alkey listen --outbox``), and what the outbox's triggers cost the writer.

    python -m benchmarks.cdc            # about two minutes: docs/cdc.md and docs/cdc.png
    python -m benchmarks.cdc --smoke    # seconds: checks every commit was bumped

A PostgreSQL of its own with ``wal_level=logical`` (as the tests start one) and a Redis of
its own. A writer that does not use alkey -- raw psycopg, autocommit -- updates one row
per transaction at a steady rate (1,000 commits per second by default), each transaction
a row no other names, and notes ``time.monotonic()`` right after each ``COMMIT`` returns.
An :class:`alkey.cdc.ChangeListener` (or, with the table's triggers installed, an
:class:`alkey.outbox.OutboxListener`) runs in a thread of the same process, with its
store's ``bump`` wrapped to note ``time.monotonic()`` right after each bump returns and
which rows it carried. The lag of a commit is the first such moment after its commit
returned, for its row: from then on, every key built from that row is new.

Reported per listener and poll interval: the rate the writer reached, p50 / p99 / max of
the lag, and how many commits the listener bumped per round trip. Absolute times on a
shared 2-core machine are noisy; the poll interval bounds the lag of an idle listener
(the outbox's ``NOTIFY`` ends its pause early), the decoding or draining query and the
bump the rest.

The writer's cost of the outbox: one-row update commits, back to back, on a table with
the outbox's triggers and on one without, in interleaved rounds
(:mod:`benchmarks.timing`: the order alternating, the garbage collector out of each
batch), with the outbox listener draining meanwhile as it would in production; the ratio
is the median of the per-round ratios, with their interquartile range. Logical decoding
adds nothing to a writer's transaction (``wal_level = logical`` itself logs a little
more for every write, with or without alkey: not measured here).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
from alkey.outbox import OutboxListener
from alkey.tokens import RedisTokenStore
from benchmarks.__main__ import fmt_ratio
from benchmarks.timing import Spread, Variant, interleave, per_call, ratio, run_batch

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: The two listeners: logical decoding, and the trigger outbox.
LISTENERS = {"decoding": "logical decoding", "outbox": "trigger outbox"}


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
    """One run: its listener, poll interval, the writer's rate, and the lags."""

    listener: str
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
    postgres: LogicalPostgres,
    client: redis.Redis,
    kind: str,
    poll_interval: float,
    rate: float,
    count: int,
) -> Result:
    dsn = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS items")
        connection.execute("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL)")
        connection.execute("INSERT INTO items SELECT g, 0 FROM generate_series(1, %s) g", (count,))
    store = TimedStore(client)
    listener: ChangeListener | OutboxListener
    if kind == "outbox":
        listener = OutboxListener(postgres.url, tokens=store, poll_interval=poll_interval)
        listener.install(["items"])
    else:
        listener = ChangeListener(postgres.url, tokens=store, poll_interval=poll_interval)
        listener.drop()
        listener.create()
    with listener:
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
                raise SystemExit(f"the {kind} listener did not bump every commit within 30 s")
            time.sleep(0.01)
        stop.set()
        thread.join()
        if isinstance(listener, OutboxListener):
            listener.uninstall()
        else:
            listener.drop()
    first_bump: dict[str, float] = {}
    for moment, identifiers in store.bumped:
        for identifier in identifiers:
            first_bump.setdefault(identifier, moment)
    lags = []
    for row, committed in commits:
        bumped = first_bump.get(row_identifier("items", row))
        if bumped is None:
            raise SystemExit(f"row {row}'s commit was never bumped ({kind})")
        lags.append(bumped - committed)
    return Result(kind, poll_interval, rate, count, count / elapsed, lags, store.round_trips)


@dataclass(frozen=True)
class WriterCost:
    """The writer's time per one-row commit, with the outbox's triggers and without."""

    rounds: int
    batch: int
    plain: Spread
    triggers: Spread
    ratio: Spread


def writer_cost(postgres: LogicalPostgres, client: redis.Redis, rounds: int) -> WriterCost:
    """Time batches of back-to-back one-row commits on a table with the outbox's
    triggers and on one without, interleaved (:mod:`benchmarks.timing`), while the
    outbox listener drains."""
    dsn = postgres.url.replace("postgresql+psycopg://", "postgresql://")
    batch = 200
    rows = batch * (rounds + 1)  # each commit a row of its own: one batch of warm-up
    with psycopg.connect(dsn, autocommit=True) as connection:
        for name in ("plain_items", "items"):
            connection.execute(f"DROP TABLE IF EXISTS {name}")
            connection.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL)")
            connection.execute(
                f"INSERT INTO {name} SELECT g, 0 FROM generate_series(1, %s) g", (rows,)
            )
    outbox = OutboxListener(postgres.url, tokens=TimedStore(client), poll_interval=0.05)
    outbox.install(["items"])
    stop = threading.Event()
    thread = threading.Thread(target=outbox.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:

            def committer(name: str) -> Variant:
                statement = f"UPDATE {name} SET n = n + 1 WHERE id = %s"
                next_row = itertools.count(1)
                return Variant(
                    name, lambda: connection.execute(statement, (next(next_row),)), batch=batch
                )

            variants = [committer("plain_items"), committer("items")]
            for variant in variants:  # warm-up, untimed
                run_batch(variant)
            series = interleave(variants, rounds)
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            outbox.drain()
        outbox.uninstall()
        outbox.close()
    return WriterCost(
        rounds,
        batch,
        per_call(series, "plain_items"),
        per_call(series, "items"),
        ratio(series, "items", "plain_items"),
    )


def table(results: list[Result]) -> str:
    lines = [
        "| listener | poll interval | commits | target rate | rate reached | lag p50 | lag p99 "
        "| lag max | commits per bump |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {LISTENERS[result.listener]} | {result.poll_interval * 1000:g} ms "
            f"| {result.commits:,} | {result.target_rate:,.0f}/s | {result.rate:,.0f}/s "
            f"| {result.quantile(0.5) * 1000:.1f} ms | {result.quantile(0.99) * 1000:.1f} ms "
            f"| {max(result.lags) * 1000:.1f} ms | {result.commits / result.round_trips:.1f} |"
        )
    return "\n".join(lines)


def cost_table(cost: WriterCost) -> str:
    return "\n".join(
        [
            "| rounds x commits | ms per commit: no triggers | ms per commit: outbox triggers "
            "| ms added per commit | triggers / none |",
            "|---:|---:|---:|---:|---:|",
            f"| {cost.rounds} x {cost.batch} | {cost.plain.median * 1000:.3f} "
            f"| {cost.triggers.median * 1000:.3f} "
            f"| {(cost.triggers.median - cost.plain.median) * 1000:.3f} "
            f"| {fmt_ratio(cost.ratio)} |",
        ]
    )


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for result in results:
        lags = sorted(lag * 1000 for lag in result.lags)
        share = [100 * (index + 1) / len(lags) for index in range(len(lags))]
        label = f"{LISTENERS[result.listener]}, poll interval {result.poll_interval * 1000:g} ms"
        axis.plot(lags, share, label=label)
    axis.set_xlabel("ms from the COMMIT returning to its token bumped")
    axis.set_ylabel("% of commits")
    axis.set_title(f"alkey listen: lag under {results[0].target_rate:,.0f} commits/s")
    axis.set_xscale("symlog", linthresh=1.0)  # a lag may be slightly negative
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
    runs = (
        [("decoding", 0.05), ("outbox", 0.05)]
        if args.smoke
        else [("decoding", 0.05), ("decoding", 0.01), ("outbox", 0.05)]
    )
    with LogicalPostgres() as postgres, EmbeddedRedis() as redis_server:
        client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
        results = [run_once(postgres, client, k, i, args.rate, count) for k, i in runs]
        cost = writer_cost(postgres, client, 3 if args.smoke else 41)
        client.close()
    rendered = table(results)
    print(rendered)
    print()
    print(cost_table(cost))
    if args.smoke:
        print(f"every one of {count} outside commits was bumped, by either listener")
        return 0
    header = (
        "# Benchmark: the lag of writes from outside the application\n\n"
        "Written by `make bench-cdc` (`python -m benchmarks.cdc`); see "
        "[Writes from outside the application](outside-writes.md).\n\n"
        "A writer that does not use alkey (raw psycopg, autocommit) updates one row per "
        "transaction at a steady rate, in a PostgreSQL of its own with `wal_level=logical`; "
        "`alkey listen`'s `ChangeListener` (logical decoding), or `alkey listen --outbox`'s "
        "`OutboxListener` (the table's triggers installed), runs beside it. The lag of a "
        "commit is the time from its `COMMIT` returning to the return of the bump that "
        "carried its row. "
        f"Python {sys.version.split()[0]}, on a shared machine: absolute times are noisy.\n\n"
    )
    cost_header = (
        "\n\n## What the outbox's triggers cost the writer\n\n"
        "One-row update commits, back to back, on a table with the outbox's triggers and "
        "on one without, in interleaved rounds (the order alternating, the garbage "
        "collector run before each batch and off during it), the outbox listener draining "
        "meanwhile. Times: medians over the rounds. Ratio: "
        "the median of the per-round ratios (p25 to p75). Logical decoding adds nothing "
        "to the writer's transaction. This PostgreSQL runs with `fsync = off`, as the "
        "tests' does, so its commits cost less than a durable server's, and the ratio "
        "overstates what the triggers add there: the milliseconds added per commit are "
        "the figure to carry over.\n\n"
    )
    DOCS.mkdir(exist_ok=True)
    (DOCS / "cdc.md").write_text(
        header + rendered + "\n\n![lag](cdc.png)" + cost_header + cost_table(cost) + "\n",
        encoding="utf-8",
    )
    plot(results, DOCS / "cdc.png")
    print(f"wrote {DOCS / 'cdc.md'} and {DOCS / 'cdc.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
