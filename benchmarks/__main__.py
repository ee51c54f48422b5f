"""What alkey costs, against floors a client without alkey pays anyway, measured side by side.

    python -m benchmarks               # ~10 minutes: docs/benchmarks.md, .png, docs/performance.md
    python -m benchmarks --no-write    # the same, printed only
    python -m benchmarks --smoke       # seconds: round-trip targets, call and line budgets (CI)
    python -m benchmarks --update-budgets   # rewrite benchmarks/budgets.json from the counts

Every comparison has a floor -- the least any client would do for the same result -- and
alkey is reported as a ratio to it:

* a key of N instances against one bare ``MGET`` of the same token keys;
* a commit (update N rows, flush, commit) against the same plain commit followed by one
  bare pipeline that sets a fresh token on every key alkey bumps;
* a read-only transaction against the same transaction without alkey;

and alkey 0.3's algorithm (``benchmarks/original.py``) alongside. How the times are taken
(interleaved rotated rounds, batches, the garbage collector kept out) is explained in
:mod:`benchmarks.timing`; why: so that the ratios hold from one run to the next on a
shared machine. Round trips are counted on the connections, and are exact.

The smoke checks only what cannot flake: the round trips, and the number of Python calls
alkey's own code makes and of its lines it runs per operation against
``benchmarks/budgets.json`` (:mod:`benchmarks.calls`), a stand-in for its CPU that is the
same on every run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
import sqlalchemy
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.embedded import EmbeddedRedis
from alkey.keys import CacheKeyGenerator
from alkey.testing import LatencyProxy, RoundTrips, counting_client
from alkey.tokens import RedisTokenStore
from benchmarks import calls
from benchmarks.original import OriginalKeyGenerator, bind_original
from benchmarks.timing import (
    Rounds,
    Series,
    Spread,
    Variant,
    calibrate,
    cpu,
    interleave,
    per_call,
    ratio,
    rounds_of,
    spread,
)
from benchmarks.workload import (
    MAX_ROWS,
    POSTGRES_URL,
    Transaction,
    bare_bump,
    bare_mget,
    bare_script,
    bump_keys,
    check_bump_names,
    check_key_names,
    engine_for,
    key_token_keys,
    label,
    listening,
    load,
    postgres_available,
    read_only,
    seed,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: The guide whose results the benchmark rewrites between its markers.
PERFORMANCE_GUIDE = DOCS / "performance.md"
START, END = "<!-- benchmark results: start -->", "<!-- benchmark results: end -->"

KEY_VARIANTS = ("bare MGET", "bare script", "alkey", "alkey 0.3")
COMMIT_VARIANTS = ("no alkey", "floor", "alkey", "alkey durable", "alkey 0.3")
READ_VARIANTS = ("plain", "listeners", "alkey")
#: Text the keys name besides their instances, as a page fragment would.
FRAGMENT = "fragment"

#: The targets of issue #14, as numbers.
KEY_TARGET = 1.25  # alkey / bare MGET
COMMIT_TARGET = 1.05  # alkey / floor
BUMP_TARGET = 0.10  # (alkey commit - plain commit) / alkey flush, at 10,000 rows
READ_TARGET = 1.03  # alkey / plain
MEMORY_TARGET = 64  # bytes per written row held between flush and commit

#: Between the quartiles of a ratio: an en dash, which stays readable next to a minus sign.
DASH = "\u2013"


@dataclass(frozen=True)
class Plan:
    """What one run measures, and for how long."""

    key_sizes: tuple[int, ...]
    commit_sizes: tuple[int, ...]
    latencies: tuple[float, ...]
    keys: Rounds
    commits: Rounds
    #: For commits of :data:`LARGE` rows and more: one call per batch, few rounds.
    large_commits: Rounds
    read_only: Rounds
    memory_rows: int

    def commit_rounds(self, rows: int) -> Rounds:
        return self.large_commits if rows >= LARGE else self.commits


LARGE = 10_000

FULL = Plan(
    key_sizes=(1, 10, 100, 1000),
    commit_sizes=(1, 100, 10_000),
    latencies=(0.0, 1.0),
    keys=Rounds(target=0.01, budget=8.0, least=21, most=61),
    commits=Rounds(target=0.015, budget=20.0, least=21, most=61),
    large_commits=Rounds(target=0.0, budget=0.0, least=11, most=11, warmup=0),
    read_only=Rounds(target=0.01, budget=8.0, least=31, most=81),
    memory_rows=10_000,
)

#: Enough to run every code path and count every round trip, not to time anything.
SMOKE = Plan(
    key_sizes=(1, 10, 100),
    commit_sizes=(1, 100),
    latencies=(0.0,),
    keys=Rounds(target=0.002, budget=0.0, least=3, most=3, warmup=2),
    commits=Rounds(target=0.002, budget=0.0, least=3, most=3, warmup=2),
    large_commits=Rounds(target=0.0, budget=0.0, least=1, most=1, warmup=0),
    read_only=Rounds(target=0.002, budget=0.0, least=3, most=3, warmup=2),
    memory_rows=1000,
)


@dataclass(frozen=True)
class Held:
    """Traced memory held after the updates and the flush of ``rows`` rows, before the
    commit: in all, with and without alkey, and (with alkey) in allocations made by lines
    of alkey's code."""

    database: str
    rows: int
    plain: int
    alkey: int
    in_alkey: int

    @property
    def per_row(self) -> float:
        return (self.alkey - self.plain) / self.rows


@dataclass
class Results:
    #: (latency ms, instances) -> the key variants' batches
    keys: dict[tuple[float, int], Series] = field(default_factory=dict)
    #: (database, latency ms, rows) -> the commit variants' batches
    commits: dict[tuple[str, float, int], Series] = field(default_factory=dict)
    #: (database, latency ms, rows) -> variant -> the most round trips of any one call's
    #: flush and commit (exact, where the batches hold averages)
    commit_trips: dict[tuple[str, float, int], dict[str, tuple[int, int]]] = field(
        default_factory=dict
    )
    #: (latency ms, instances) -> round trips of one key, counted alone
    key_trips: dict[tuple[float, int], int] = field(default_factory=dict)
    #: database -> the read-only variants' batches (at 0 ms)
    read_only: dict[str, Series] = field(default_factory=dict)
    #: (database, variant) -> round trips of one read-only transaction
    read_only_trips: dict[tuple[str, str], int] = field(default_factory=dict)
    memory: Held | None = None
    #: operation -> alkey's calls and lines (:mod:`benchmarks.calls`)
    counts: dict[str, calls.Counts] = field(default_factory=dict)


def count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def redis_at(latency_ms: float, server: EmbeddedRedis) -> Iterator[str]:
    """The URL of ``server``, behind a proxy that adds ``latency_ms`` per request."""
    if not latency_ms:
        yield server.url
        return
    with LatencyProxy(server.port, latency_ms / 1000) as proxy:
        yield proxy.url


def measure(what: str, variants: list[Variant], rounds: Rounds) -> Series:
    started = time.perf_counter()
    number = calibrate(variants, rounds)
    series = interleave(variants, number)
    batches = "/".join(str(variant.batch) for variant in variants)
    progress(f"  {what}: {number} rounds of {batches} calls, {time.perf_counter() - started:.1f} s")
    return series


# -- key generation ------------------------------------------------------------------------


def bench_keys(url: str, latency: float, plan: Plan, workdir: Path, results: Results) -> None:
    engine = engine_for("sqlite", workdir, "keys")
    seed(engine, 1, max(plan.key_sizes))
    clients = {name: counting_client(url) for name in KEY_VARIANTS}
    generator = CacheKeyGenerator(clients["alkey"])
    original = OriginalKeyGenerator(clients["alkey 0.3"])
    try:
        with Session(engine) as session:
            items = load(session, 1, max(plan.key_sizes))
            for size in plan.key_sizes:
                chosen = items[:size]
                check_key_names(generator, chosen, FRAGMENT)
                keys = key_token_keys(chosen)
                identifiers = generator.plan(*chosen, FRAGMENT).identifiers
                variants = [
                    Variant("bare MGET", bare_mget(clients["bare MGET"], keys)),
                    Variant("bare script", bare_script(clients["bare script"], keys)),
                    Variant("alkey", partial(generator, *chosen, FRAGMENT)),
                    Variant("alkey 0.3", partial(original, *chosen, FRAGMENT)),
                    # alkey's two halves, for what its cost is made of (key_parts_table)
                    Variant("alkey encoding", partial(generator.plan, *chosen, FRAGMENT)),
                    Variant("alkey fetch", partial(generator.tokens.fetch, identifiers)),
                    # the least Python any client runs for such a key: naming its tokens
                    Variant("naming alone", partial(key_token_keys, chosen)),
                ]
                what = f"key of {count(size, 'instance')}, {latency:g} ms"
                results.keys[(latency, size)] = measure(what, variants, plan.keys)
                with RoundTrips() as sent:
                    generator(*chosen, FRAGMENT)
                results.key_trips[(latency, size)] = sent.count
    finally:
        for client in clients.values():
            client.close()
        engine.dispose()


# -- commits, read-only transactions, memory -------------------------------------------------


def first_row(variant: str) -> int:
    """Each commit variant writes rows of its own (on PostgreSQL they share a table)."""
    return 1 + COMMIT_VARIANTS.index(variant) * MAX_ROWS


def engines_for(database: str, workdir: Path, tag: str, rows: int) -> dict[str, Engine]:
    """An engine per commit variant, each holding ``rows`` rows of its own."""
    engines = {name: engine_for(database, workdir, f"{tag} {name}") for name in COMMIT_VARIANTS}
    for number, (name, engine) in enumerate(engines.items()):
        # One table per SQLite file; on PostgreSQL one table, made by the first.
        fresh = database == "sqlite" or number == 0
        seed(engine, first_row(name), rows, fresh=fresh)
    return engines


def bench_commits(
    url: str, latency: float, database: str, plan: Plan, workdir: Path, results: Results
) -> None:
    """Every commit size on ``database``; at 0 ms also the read-only transaction, and on
    the first database the memory a flush holds."""
    where = label(database)
    rows = max(*plan.commit_sizes, plan.memory_rows)
    engines = engines_for(database, workdir, f"{where} {latency:g}", rows)
    clients = {name: counting_client(url) for name in COMMIT_VARIANTS if name != "no alkey"}
    factories: dict[str, sessionmaker[Session]] = {
        name: sessionmaker(engine, expire_on_commit=False) for name, engine in engines.items()
    }
    alkey.bind(factories["alkey"], tokens=RedisTokenStore(clients["alkey"]))
    alkey.bind(
        factories["alkey durable"], tokens=RedisTokenStore(clients["alkey durable"], durable=True)
    )
    bind_original(factories["alkey 0.3"], clients["alkey 0.3"])
    try:
        for size in plan.commit_sizes:
            what = f"commit of {count(size, 'row')}, {where}, {latency:g} ms"
            rounds = plan.commit_rounds(size)
            series, most = bench_commit(what, factories, clients["floor"], size, rounds)
            results.commits[(where, latency, size)] = series
            results.commit_trips[(where, latency, size)] = most
        if not latency:
            bench_read_only(database, workdir, factories, plan, results)
            if results.memory is None:
                results.memory = held_memory(where, factories, plan.memory_rows)
    finally:
        alkey.unbind(factories["alkey"])
        alkey.unbind(factories["alkey durable"])
        for client in clients.values():
            client.close()
        for engine in engines.values():
            engine.dispose()


def bench_commit(
    what: str,
    factories: dict[str, sessionmaker[Session]],
    floor_client: redis.Redis,
    size: int,
    rounds: Rounds,
) -> tuple[Series, dict[str, tuple[int, int]]]:
    """One commit size: a session per variant, its rows loaded, updated on every call;
    and the most round trips any one call's flush and commit made, per variant."""
    sessions = {name: factory() for name, factory in factories.items()}
    try:
        variants = []
        writes: dict[str, Transaction] = {}
        for name, session in sessions.items():
            items = load(session, first_row(name), size)
            bump = None
            if name == "floor":
                check_bump_names(items)
                bump = bare_bump(floor_client, bump_keys(items))
            write = writes[name] = Transaction(session, items, name[:4], after_commit=bump)
            variants.append(Variant(name, write, write.laps))
        series = measure(what, variants, rounds)
        most = {n: (w.most_flush_trips, w.most_commit_trips) for n, w in writes.items()}
        return series, most
    finally:
        for session in sessions.values():
            session.close()


def bench_read_only(
    database: str,
    workdir: Path,
    factories: dict[str, sessionmaker[Session]],
    plan: Plan,
    results: Results,
) -> None:
    """Plain, with listeners that do nothing on alkey's events (its own engine, with the
    plain variant's row), and with alkey."""
    where = label(database)
    engine = engine_for(database, workdir, f"{where} listeners")
    if database == "sqlite":  # its own file; on PostgreSQL the plain variant's row
        seed(engine, first_row("no alkey"), 1)
    listeners = sessionmaker(engine, expire_on_commit=False)
    listening(listeners, engine)
    variants = [
        Variant("plain", read_only(factories["no alkey"])),
        Variant("listeners", read_only(listeners)),
        Variant("alkey", read_only(factories["alkey"])),
    ]
    try:
        results.read_only[where] = measure(
            f"read-only transaction, {where}", variants, plan.read_only
        )
    finally:
        engine.dispose()
    for name in ("alkey", "alkey durable"):
        transaction = read_only(factories[name])
        transaction()
        with RoundTrips() as sent:
            transaction()
        results.read_only_trips[(where, name)] = sent.count


def held_by_flush(factory: sessionmaker[Session], first: int, rows: int) -> tuple[int, int]:
    """Traced bytes still held after updating and flushing ``rows`` rows, before the commit;
    and how many of them were allocated by lines of alkey's code.

    One frame per trace: a deeper traceback would also catch what SQLAlchemy allocates
    when alkey calls it, but makes a 10,000-row flush take tens of seconds; that part is
    in the difference with and without alkey (:func:`held_memory`) anyway.
    """
    with factory() as session:
        items = load(session, first, rows)
        Transaction(session, items, "warm")()  # statements compiled, alkey's plans learnt
        gc.collect()
        tracemalloc.start(1)
        try:
            started = tracemalloc.get_traced_memory()[0]
            for item in items:
                item.name = "held"
            session.flush()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - started
            ours = tracemalloc.Filter(True, f"{calls.ALKEY_DIR}*")
            snapshot = tracemalloc.take_snapshot().filter_traces([ours])
            in_alkey = sum(trace.size for trace in snapshot.traces)
        finally:
            tracemalloc.stop()
        session.commit()
    return held, in_alkey


def held_memory(where: str, factories: dict[str, sessionmaker[Session]], rows: int) -> Held:
    """What alkey keeps between a flush and its commit, per written row.

    Measured as the traced memory a flush of ``rows`` updated rows leaves held with alkey,
    minus the same without alkey: that counts everything alkey causes to be kept, also
    what SQLAlchemy allocates on alkey's behalf. The bytes allocated by alkey's own lines
    are given as a cross-check (they miss what is allocated on its behalf, so they should
    not exceed the difference by more than noise).
    """
    progress(f"  memory held by a flush of {rows} rows")
    plain, _ = held_by_flush(factories["no alkey"], first_row("no alkey"), rows)
    with_alkey, in_alkey = held_by_flush(factories["alkey"], first_row("alkey"), rows)
    return Held(where, rows, plain, with_alkey, in_alkey)


def run(plan: Plan, databases: list[str], server: EmbeddedRedis, workdir: Path) -> Results:
    results = Results()
    for latency in plan.latencies:
        with redis_at(latency, server) as url:
            progress(f"Redis at +{latency:g} ms")
            bench_keys(url, latency, plan, workdir, results)
            for database in databases:
                bench_commits(url, latency, database, plan, workdir, results)
    return results


# -- report ------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def fmt_ratio(value: Spread, percent: bool = False) -> str:
    if percent:
        return f"{value.median:.0%} ({value.low:.0%}{DASH}{value.high:.0%})"
    digits = 2 if value.high < 10 else 1 if value.high < 100 else 0
    low, high = f"{value.low:.{digits}f}", f"{value.high:.{digits}f}"
    return f"{value.median:.{digits}f} ({low}{DASH}{high})"


def trips(series: Series, name: str, lap: str | None = None) -> str:
    """Round trips per call, over every round (exact when they agree, else the range)."""
    values = {batch.laps[lap] if lap else batch.trips for batch in series[name]}
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def bump_share(series: Series, name: str = "alkey") -> Spread:
    """Per round: ``name``'s commit minus the plain commit, over alkey's flush (with the
    floor: what the bare bump alone costs, on the same scale)."""
    return spread(
        (ours.laps["commit"] - plain.laps["commit"]) / flush.laps["flush"]
        for ours, plain, flush in zip(
            series[name], series["no alkey"], series["alkey"], strict=True
        )
    )


def batches(series: Series, names: tuple[str, ...]) -> str:
    calls_per_batch = "/".join(str(series[name][0].calls) for name in names)
    return f"{rounds_of(series)} x {calls_per_batch}"


def keys_table(results: Results) -> list[str]:
    lines = [
        "### Key generation",
        "",
        "A key of N loaded instances and a text fragment. Floor: one redis-py `MGET` of the "
        "same N + 2 token keys (each row's, the table's unknown-rows token, the "
        "unknown-writes token), their names built beforehand. Bare script: the `EVALSHA`s of "
        "alkey's fetch script that alkey sends for the same keys (one per 1,000 keys, in one "
        "pipeline beyond that), without alkey's Python -- the part of the cost that is "
        "Redis's and redis-py's (the script reads the server's epoch and creates missing "
        "tokens, which an `MGET` cannot). CPU: the calling thread's.",
        "",
        "| latency | instances | rounds x calls: MGET/script/alkey/0.3 | ms: bare MGET "
        "| ms: bare script | ms: alkey | ms: alkey 0.3 | alkey / bare MGET "
        "| script / bare MGET | alkey / script | 0.3 / alkey | CPU µs: MGET / script / alkey "
        "| round trips: alkey / 0.3 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (latency, size), series in results.keys.items():
        times = [fmt_ms(per_call(series, name).median) for name in KEY_VARIANTS]
        cpus = " / ".join(
            f"{per_call(series, name, cpu).median * 1e6:.0f}"
            for name in ("bare MGET", "bare script", "alkey")
        )
        lines.append(
            f"| {latency:g} ms | {size} | {batches(series, KEY_VARIANTS)} | {' | '.join(times)} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'bare MGET'))} "
            f"| {fmt_ratio(ratio(series, 'bare script', 'bare MGET'))} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'bare script'))} "
            f"| {fmt_ratio(ratio(series, 'alkey 0.3', 'alkey'))} "
            f"| {cpus} "
            f"| {trips(series, 'alkey')} / {trips(series, 'alkey 0.3')} |"
        )
    return lines


def key_parts_table(results: Results) -> list[str]:
    """What the CPU of a key is made of, next to what the target leaves for it."""
    lines = [
        "### What a key's CPU is made of",
        "",
        "CPU of the calling thread per key, without added latency, from the same rounds as "
        "the table above. A key is its encoding (`CacheKeyGenerator.plan`: the arguments "
        "encoded, the token names listed, no I/O) and its fetch (`TokenStore.fetch` of those "
        "names: the script's round trip, with alkey's outage, recovery and epoch bookkeeping "
        "around it), each also timed alone; alkey's Python is the key's CPU minus the bare "
        "script's, and what it costs beyond its halves timed alone is the price of running "
        "both halves' code in one call (the CPU's caches hold less of it). Room: what the "
        f"target (≤ {KEY_TARGET} x the bare MGET) leaves above the bare script, which a key "
        "cannot do without (it reads the server's epoch and creates missing tokens). "
        "Naming: the floor's own Python, which the MGET variant runs beforehand -- the N + 2 "
        "token names spelled from the loaded instances (`benchmarks/workload.py`), the least "
        "any client does for such a key.",
        "",
        "| instances | CPU µs: bare MGET | bare script | alkey | alkey's Python "
        "| encoding alone | fetch beyond the script, alone | together beyond the halves "
        "| per instance | naming alone | room under the target |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (latency, size), series in results.keys.items():
        if latency or "alkey encoding" not in series:
            continue

        def us(name: str, series: Series = series) -> float:
            return per_call(series, name, cpu).median * 1e6

        mget, script, whole = us("bare MGET"), us("bare script"), us("alkey")
        encoding, fetch, naming = us("alkey encoding"), us("alkey fetch"), us("naming alone")
        python = whole - script
        lines.append(
            f"| {size} | {mget:.0f} | {script:.0f} | {whole:.0f} | {python:.0f} "
            f"| {encoding:.0f} | {fetch - script:.0f} | {whole - encoding - fetch:.0f} "
            f"| {python / size:.1f} | {naming:.1f} | {KEY_TARGET * mget - script:.0f} |"
        )
    return lines


def commits_table(results: Results) -> list[str]:
    lines = [
        "### Commits (update N rows, flush, commit)",
        "",
        "Floor: the plain flush and commit, then the bump alkey sends, bare: one redis-py "
        "pipeline (no MULTI) of `EVALSHA`s of its bump script, one per 1,000 keys, on each "
        "key alkey bumps (each row's, the table's, the global one), their names built "
        "beforehand, with alkey's expiry and a fresh random base per call. Bump / flush: alkey's "
        "commit minus the plain commit, over alkey's flush, per round. Client CPU: the "
        "calling thread's, which a busy machine disturbs less than wall time (on "
        "PostgreSQL it leaves out the server's work, so it overstates alkey's share).",
        "",
        "| database | latency | rows | rounds | ms: no alkey | ms: floor | ms: alkey "
        "| ms: durable | ms: alkey 0.3 | alkey / floor | durable / floor | alkey / no alkey "
        "| client CPU: alkey / floor | bump / flush "
        "| round trips flush + commit: alkey / durable / 0.3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (where, latency, size), series in results.commits.items():
        times = " | ".join(fmt_ms(per_call(series, name).median) for name in COMMIT_VARIANTS)
        counted = " / ".join(
            f"{trips(series, name, 'flush trips')} + {trips(series, name, 'commit trips')}"
            for name in ("alkey", "alkey durable", "alkey 0.3")
        )
        lines.append(
            f"| {where} | {latency:g} ms | {size} | {rounds_of(series)} | {times} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'floor'))} "
            f"| {fmt_ratio(ratio(series, 'alkey durable', 'floor'))} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'no alkey'))} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'floor', cpu))} "
            f"| {fmt_ratio(bump_share(series), percent=True)} | {counted} |"
        )
    return lines


def read_only_table(results: Results) -> list[str]:
    lines = [
        "### Read-only transactions",
        "",
        "A new session, one `SELECT` of one row, commit, close; 0 ms. Listeners: the same "
        "transaction with a listener that does nothing on each session and engine event "
        "alkey listens to -- what SQLAlchemy's event dispatch costs any library that learns "
        "of writes from its events, before that library does any work.",
        "",
        "| database | rounds x calls | µs: plain | µs: listeners | µs: alkey "
        "| listeners / plain | alkey / plain | alkey / listeners "
        "| round trips: alkey / durable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for where, series in results.read_only.items():
        plain, listened, ours = (per_call(series, name).median * 1e6 for name in READ_VARIANTS)
        lines.append(
            f"| {where} | {batches(series, READ_VARIANTS)} | {plain:.0f} | {listened:.0f} "
            f"| {ours:.0f} | {fmt_ratio(ratio(series, 'listeners', 'plain'))} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'plain'))} "
            f"| {fmt_ratio(ratio(series, 'alkey', 'listeners'))} "
            f"| {results.read_only_trips[(where, 'alkey')]} "
            f"/ {results.read_only_trips[(where, 'alkey durable')]} |"
        )
    return lines


def memory_table(held: Held) -> list[str]:
    return [
        "### Memory held between flush and commit",
        "",
        f"Traced memory (`tracemalloc`) still allocated after updating and flushing "
        f"{held.rows:,} rows, before the commit, on {held.database}. Per row: with alkey minus "
        "without, which counts all alkey causes to be kept; the last column, the part "
        "allocated by alkey's own lines, is a cross-check.",
        "",
        "| rows | KiB: no alkey | KiB: alkey | alkey - no alkey, B/row "
        "| allocated by alkey's lines, B/row |",
        "|---:|---:|---:|---:|---:|",
        f"| {held.rows:,} | {held.plain / 1024:,.0f} | {held.alkey / 1024:,.0f} "
        f"| {held.per_row:.1f} | {held.in_alkey / held.rows:.1f} |",
    ]


@dataclass(frozen=True)
class Target:
    """One target of the issue: the worst case over what it covers."""

    what: str
    value: str
    where: str
    met: bool
    #: What alkey cannot do without, measured on the same scale (its floor), if any.
    unavoidable: str = "\u2014"


def worst(
    cases: dict[str, Spread], limit: float, *, percent: bool = False
) -> tuple[str, str, bool]:
    """The case with the highest median, and whether every case is within ``limit``."""
    where, value = max(cases.items(), key=lambda case: case[1].median)
    missed = [name for name, case in cases.items() if case.median > limit]
    where = f"worst of {len(cases)}: {where}"
    if missed and len(cases) > 1:
        where += f"; missed in {len(missed)}"
    return fmt_ratio(value, percent=percent), where, not missed


def unavoidable(what: str, cases: dict[str, Spread], limit: float, *, percent: bool = False) -> str:
    """A floor's worst case, and in how many of the cases the floor alone exceeds
    ``limit`` (there the target is out of reach whatever alkey does)."""
    where, value = max(cases.items(), key=lambda case: case[1].median)
    over = sum(case.median > limit for case in cases.values())
    return (
        f"{what}: {fmt_ratio(value, percent=percent)} at worst ({where}); over the target "
        f"by itself in {over} of {len(cases)}"
    )


def targets(results: Results) -> list[Target]:
    found = []
    if results.keys:
        cases = {
            f"{count(size, 'instance')}, {latency:g} ms": ratio(series, "alkey", "bare MGET")
            for (latency, size), series in results.keys.items()
        }
        least = {
            f"{count(size, 'instance')}, {latency:g} ms": spread(
                (script.wall + naming.wall) / mget.wall
                for script, naming, mget in zip(
                    series["bare script"], series["naming alone"], series["bare MGET"], strict=True
                )
            )
            for (latency, size), series in results.keys.items()
            if "naming alone" in series
        }
        found.append(
            Target(
                f"key: alkey / bare MGET ≤ {KEY_TARGET}",
                *worst(cases, KEY_TARGET),
                unavoidable=unavoidable(
                    "(bare script + naming the token keys) / bare MGET", least, KEY_TARGET
                ),
            )
        )
    if results.commits:
        cases = {
            f"{where}, {count(size, 'row')}, {latency:g} ms": ratio(series, "alkey", "floor")
            for (where, latency, size), series in results.commits.items()
        }
        found.append(
            Target(f"commit: alkey / floor ≤ {COMMIT_TARGET}", *worst(cases, COMMIT_TARGET))
        )
        cases = {
            f"{where}, {latency:g} ms": bump_share(series)
            for (where, latency, size), series in results.commits.items()
            if size >= LARGE
        }
        bare = {
            f"{where}, {latency:g} ms": bump_share(series, "floor")
            for (where, latency, size), series in results.commits.items()
            if size >= LARGE
        }
        if cases:
            found.append(
                Target(
                    f"bump / flush at {LARGE:,} rows ≤ {BUMP_TARGET:.0%}",
                    *worst(cases, BUMP_TARGET, percent=True),
                    unavoidable=unavoidable(
                        "the bare bump alone / alkey's flush", bare, BUMP_TARGET, percent=True
                    ),
                )
            )
    if results.read_only:
        cases = {
            where: ratio(series, "alkey", "plain") for where, series in results.read_only.items()
        }
        listeners = {
            where: ratio(series, "listeners", "plain")
            for where, series in results.read_only.items()
        }
        found.append(
            Target(
                f"read-only: alkey / plain ≤ {READ_TARGET}",
                *worst(cases, READ_TARGET),
                unavoidable=unavoidable(
                    "SQLAlchemy's no-op listeners on alkey's events / plain", listeners, READ_TARGET
                ),
            )
        )
    if results.memory is not None:
        per_row = results.memory.per_row
        found.append(
            Target(
                f"memory held per written row ≤ {MEMORY_TARGET} B",
                f"{per_row:.1f} B",
                f"{results.memory.rows:,} rows, {results.memory.database}",
                per_row <= MEMORY_TARGET,
            )
        )
    failures = check_round_trips(results)
    found.append(
        Target(
            "round trips: 1 per key, 0 per flush, ≤ 1 per commit (durable ≤ 2), "
            "0 per read-only transaction",
            "as targeted" if not failures else f"{len(failures)} off",
            "every case above",
            not failures,
        )
    )
    return found


def targets_table(results: Results) -> list[str]:
    lines = [
        "### Targets",
        "",
        "Ratios: median of the per-round ratios (p25 to p75); a target is met when the median "
        "is within it in every case it covers, the worst of which is shown.",
        "",
        "| target | measured | where | met | what alkey cannot do without |",
        "|---|---:|---|---|---|",
    ]
    for target in targets(results):
        mark = "met" if target.met else "**missed**"
        lines.append(
            f"| {target.what} | {target.value} | {target.where} | {mark} | {target.unavoidable} |"
        )
    return lines


def method(plan: Plan, results: Results, seconds: float, about: str) -> str:
    counts = [
        rounds_of(series)
        for group in (results.keys, results.commits, results.read_only)
        for series in group.values()
    ]
    large = f", one call for commits of {LARGE:,} rows" if max(plan.commit_sizes) >= LARGE else ""
    smoke = (
        "Smoke run: far too short to time anything, so no time is checked; only the round "
        "trips and alkey's call and line counts are. "
        if plan is SMOKE
        else ""
    )
    return (
        f"{smoke}Every variant of a comparison is measured in the same run, in interleaved "
        "rounds: each round times one batch of every variant, the order rotating from round "
        "to round (round r starts with variant r mod k; every other cycle of k rounds runs "
        "backwards, so no variant always follows the same one), so that drift of the machine "
        "hits all alike. A batch is several calls, sized to about "
        f"{plan.keys.target * 1000:g} ms ({plan.commits.target * 1000:g} ms for commits"
        f"{large}), with the garbage collector run before it and disabled during it. Each "
        "commit variant has its own engine (on SQLite its own database file; on PostgreSQL "
        "its own pool and its own rows of one table) and its own Redis connection; latency "
        "is added by a proxy in front of Redis. "
        f"This run: {min(counts)} to {max(counts)} rounds per comparison (fewer for slow "
        "ones). Times are medians over the rounds of the wall time per call; a ratio is the "
        "median of the per-round ratios of two variants, and p25 to p75 the interquartile "
        "range of those per-round ratios. Round trips are counted on the connections, and "
        f"are exact. {about}; {seconds / 60:.1f} minutes."
    )


def report(plan: Plan, results: Results, seconds: float, about: str) -> str:
    sections = [
        [method(plan, results, seconds, about)],
        targets_table(results),
        keys_table(results),
        key_parts_table(results),
        commits_table(results),
        read_only_table(results),
    ]
    if results.memory is not None:
        sections.append(memory_table(results.memory))
    if results.counts:
        sections.append(
            [
                "### alkey's Python calls and lines per operation",
                "",
                "Calls into alkey's own code and lines of it executed, counted with "
                "`sys.settrace`: what `make bench-smoke` holds to `benchmarks/budgets.json`, "
                "as a stand-in for alkey's CPU that is the same on every run. Calls miss "
                "work repeated inside one function (a loop or comprehension over the "
                "instances makes no more calls for more instances); lines count every "
                "iteration. Neither counts instructions, nor work done in C.",
                "",
                calls.report(results.counts, calls.load_budgets()).rstrip("\n"),
            ]
        )
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def check_round_trips(results: Results) -> list[str]:
    """The round-trip targets; exact, so CI can hold them."""
    failures = []
    for (latency, size), series in results.keys.items():
        alone = results.key_trips.get((latency, size))
        if alone != 1 or any(batch.trips != 1 for batch in series["alkey"]):
            failures.append(
                f"key of {count(size, 'instance')} at {latency:g} ms: {alone} round trip(s) "
                f"alone, {trips(series, 'alkey')} per call in the batches"
            )
    limits = {"alkey": 1, "alkey durable": 2}  # durable: the intent, then the bump
    for (where, latency, size), most in results.commit_trips.items():
        for name, limit in limits.items():
            flush, commit = most[name]
            if flush != 0 or commit > limit:
                failures.append(
                    f"{where} {name} commit of {count(size, 'row')} at {latency:g} ms: up to "
                    f"{flush} round trip(s) in a flush, {commit} in a commit"
                )
    for (where, name), sent in results.read_only_trips.items():
        if sent:
            failures.append(f"{where} {name} read-only transaction: {sent} round trips")
    for where, series in results.read_only.items():
        if any(batch.trips for batch in series["alkey"]):
            failures.append(f"{where} alkey read-only transaction: {trips(series, 'alkey')}")
    return failures


def plot_key_times(
    axis: Any, series: Mapping[tuple[float, int], Series], colours: Mapping[str, str], title: str
) -> None:
    """Draw on ``axis`` the wall time per key of each variant named in ``colours``, against
    the instances in the key, a line per latency (``series`` by latency and size)."""
    from matplotlib.ticker import FuncFormatter

    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    latencies = sorted({latency for latency, _ in series})
    for latency in latencies:
        sizes = sorted(size for lat, size in series if lat == latency)
        for name, colour in colours.items():
            spreads = [per_call(series[(latency, size)], name).scaled(1000) for size in sizes]
            axis.errorbar(
                sizes,
                [s.median for s in spreads],
                yerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]],
                fmt="-o" if latency == latencies[0] else "--s",
                color=colour,
                capsize=2,
                label=f"{name}, +{latency:g} ms",
            )
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.xaxis.set_major_formatter(plain_numbers)
    axis.yaxis.set_major_formatter(plain_numbers)
    axis.set_xlabel("model instances in one cache key")
    axis.set_ylabel("wall time per key (ms, median and quartiles)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize="small")


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, (keys, commits) = plt.subplots(1, 2, figsize=(11, 4.5))
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    colours = {
        "bare MGET": "grey",
        "bare script": "tab:green",
        "alkey": "tab:blue",
        "alkey 0.3": "tab:red",
    }
    plot_key_times(keys, results.keys, colours, "Key generation")
    for where, latency in sorted({(where, latency) for where, latency, _ in results.commits}):
        sizes = sorted(size for w, lat, size in results.commits if (w, lat) == (where, latency))
        spreads = [
            ratio(results.commits[(where, latency, size)], "alkey", "floor") for size in sizes
        ]
        commits.errorbar(
            sizes,
            [s.median for s in spreads],
            yerr=[[s.median - s.low for s in spreads], [s.high - s.median for s in spreads]],
            fmt="-o",
            capsize=2,
            label=f"{where}, +{latency:g} ms",
        )
    commits.axhline(COMMIT_TARGET, color="firebrick", linestyle=":", label="target")
    commits.axhline(1.0, color="grey", linewidth=0.8)
    commits.set_xscale("log")
    commits.xaxis.set_major_formatter(plain_numbers)
    commits.set_xlabel("rows updated in one commit")
    commits.set_ylabel("alkey / floor (median of rounds, quartiles)")
    commits.set_title("Commit: alkey over the plain commit + one bare bump")
    commits.grid(True, which="both", alpha=0.3)
    commits.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def update_guide(
    table: str, guide: Path = PERFORMANCE_GUIDE, start: str = START, end: str = END
) -> None:
    """Replace the results in the docs page ``guide`` between the markers ``start`` and
    ``end`` (this benchmark's, by default) with a run's tables."""
    text = guide.read_text(encoding="utf-8")
    before, found, rest = text.partition(start)
    _, found_end, after = rest.partition(end)
    if not (found and found_end):
        print(f"{guide} has no {start} ... {end} markers; left unchanged", file=sys.stderr)
        return
    guide.write_text(f"{before}{start}\n{table}{end}{after}", encoding="utf-8")


def write_docs(table: str, results: Results) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "benchmarks.md").write_text(
        "# Benchmarks\n\nGenerated by `make bench` (`python -m benchmarks`).\n\n"
        "![Key generation and commit ratios](benchmarks.png)\n\n" + table.replace("### ", "## "),
        encoding="utf-8",
    )
    plot(results, DOCS / "benchmarks.png")
    update_guide(table)
    print(f"wrote {DOCS / 'benchmarks.md'}, {DOCS / 'benchmarks.png'} and {PERFORMANCE_GUIDE}")


def versions(server: EmbeddedRedis) -> str:
    output = subprocess.run(
        [server.executable, "--version"], capture_output=True, text=True, check=False
    ).stdout
    number = next((part[2:] for part in output.split() if part.startswith("v=")), "?")
    return (
        f"Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}, "
        f"redis-py {redis.__version__}, redis-server {number}, {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: check round trips and the call and line budgets",
    )
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--database", action="append", help="sqlite or a SQLAlchemy URL")
    parser.add_argument(
        "--update-budgets",
        action="store_true",
        help=f"count alkey's calls and lines, rewrite {calls.BUDGETS.name} (count + 10 %%)",
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.database:
        databases = args.database
    elif args.smoke or not postgres_available():
        databases = ["sqlite"]
    else:
        databases = ["sqlite", POSTGRES_URL]
    started = time.perf_counter()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.update_budgets:
            counts = calls.count_operations(server.url, workdir)
            budgets = calls.write_budgets(counts)
            print(calls.report(counts, budgets))
            print(f"wrote {calls.BUDGETS}")
            return 0
        results = run(plan, databases, server, workdir)
        progress("alkey's Python calls and lines per operation")
        results.counts = calls.count_operations(server.url, workdir)
        about = versions(server)
    table = report(plan, results, time.perf_counter() - started, about)
    print(table)
    if not (args.smoke or args.no_write):
        write_docs(table, results)
    failures = check_round_trips(results)
    failures += calls.over_budget(results.counts, calls.load_budgets())
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(
        "round trips as targeted (1 per key, 0 per flush, <= 1 per commit, durable <= 2, "
        "0 per read-only transaction); alkey's calls and lines within budgets.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
