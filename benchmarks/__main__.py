"""Side-by-side benchmark: no alkey, alkey, and the algorithm of alkey 0.3.

    python -m benchmarks            # full run: writes docs/benchmarks.md and .png
    python -m benchmarks --smoke    # seconds: checks the round-trip targets, writes nothing

Round trips are counted (deterministic) and cross-checked with a proxy that adds a fixed
latency to every request. Times are medians; they are noisy on shared machines, which is
why the tables lead with round trips and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from sqlalchemy import Engine, String, create_engine, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.testing import LatencyProxy, RoundTrips, counting_client
from alkey.tokens import RedisTokenStore
from benchmarks.original import OriginalKeyGenerator, bind_original

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DOCS = Path(__file__).resolve().parent.parent / "docs"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@dataclass
class Sample:
    """One measured operation: round trips per call and time per call."""

    round_trips: float
    seconds: float
    cpu_seconds: float = 0.0


@dataclass
class Results:
    keys: dict[tuple[float, str, int], Sample] = field(default_factory=dict)
    commits: dict[tuple[str, float, str, int], tuple[Sample, Sample]] = field(default_factory=dict)
    read_only: dict[str, int] = field(default_factory=dict)


def measure(call: Callable[[], object], repeat: int) -> Sample:
    """Median wall and CPU time of ``call``, and its round trips per call."""
    walls, cpus = [], []
    with RoundTrips() as trips:
        for _ in range(repeat):
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            cpus.append(time.process_time() - cpu)
            walls.append(time.perf_counter() - wall)
    return Sample(trips.count / repeat, statistics.median(walls), statistics.median(cpus))


@contextmanager
def redis_at(latency_ms: float, server: EmbeddedRedis) -> Iterator[str]:
    if not latency_ms:
        yield server.url
        return
    proxy = LatencyProxy(server.port, latency_ms / 1000)
    try:
        yield proxy.url
    finally:
        proxy.close()


def engine_for(url: str, workdir: Path) -> Engine:
    if url == "sqlite":
        return create_engine(f"sqlite:///{workdir / 'bench.db'}")
    return create_engine(url)


def seed(engine: Engine, rows: int) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Item(name="x") for _ in range(rows)])
        session.commit()


def bench_keys(
    url: str, latency: float, sizes: list[int], engine: Engine, results: Results
) -> None:
    client = counting_client(url)
    seed(engine, max(sizes))
    with Session(engine) as session:
        items = session.scalars(select(Item).order_by(Item.id)).all()
    generators: dict[str, Callable[..., str]] = {
        "alkey": CacheKeyGenerator(client),
        "alkey 0.3": OriginalKeyGenerator(client),
    }
    for size in sizes:
        args = (*items[:size], "fragment")
        for name, generator in generators.items():
            generator(*args)  # create the tokens first: measure the steady state
            budget = 200 if not latency else 20
            repeat = max(3, min(budget, budget * 100 // (size if name != "alkey" else 1)))
            results.keys[(latency, name, size)] = measure(partial(generator, *args), repeat)
    client.close()


def bench_commits(
    url: str, latency: float, database: str, sizes: list[int], engine: Engine, results: Results
) -> None:
    client = counting_client(url)
    variants: dict[str, sessionmaker[Session]] = {
        name: sessionmaker(engine, expire_on_commit=False)
        for name in ("no alkey", "alkey", "alkey durable", "alkey 0.3")
    }
    alkey.bind(variants["alkey"], tokens=RedisTokenStore(client))
    alkey.bind(variants["alkey durable"], tokens=RedisTokenStore(client, durable=True))
    bind_original(variants["alkey 0.3"], client)
    for size in sizes:
        seed(engine, size)
        repeat = 3 if size >= 10_000 else (30 if size >= 100 else 200)
        flushes: dict[str, list[Sample]] = {name: [] for name in variants}
        commits: dict[str, list[Sample]] = {name: [] for name in variants}
        sessions = {name: factory() for name, factory in variants.items()}
        loaded = {name: s.scalars(select(Item)).all() for name, s in sessions.items()}
        for round_number in range(repeat):
            for name, session in sessions.items():  # interleaved, so drift hits all alike
                for item in loaded[name]:
                    item.name = f"{name[:4]}{round_number}"
                flushes[name].append(measure(session.flush, 1))
                commits[name].append(measure(session.commit, 1))
        for name in variants:
            results.commits[(database, latency, name, size)] = (
                _median(flushes[name]),
                _median(commits[name]),
            )
        for session in sessions.values():
            session.close()
    for name in ("alkey", "alkey durable", "alkey 0.3"):
        with variants[name]() as session:
            session.scalars(select(Item).limit(1)).all()
            results.read_only[name] = int(measure(session.commit, 1).round_trips)
    alkey.unbind(variants["alkey"])
    alkey.unbind(variants["alkey durable"])
    client.close()


def _median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.round_trips for s in samples),
        statistics.median(s.seconds for s in samples),
        statistics.median(s.cpu_seconds for s in samples),
    )


def postgres_available() -> bool:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


# -- report -----------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}" if seconds < 0.01 else f"{seconds * 1000:.1f}"


def report(results: Results, sizes: list[int], latencies: list[float]) -> str:
    lines = ["### Key generation", ""]
    lines.append(
        "| latency | instances | round trips: alkey | round trips: 0.3 | ms/key: alkey "
        "| ms/key: 0.3 | 0.3 / alkey | alkey client CPU µs/instance |"
    )
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for latency in latencies:
        base = results.keys[(latency, "alkey", sizes[0])]
        for size in sizes:
            new = results.keys[(latency, "alkey", size)]
            old = results.keys[(latency, "alkey 0.3", size)]
            # Marginal CPU per instance; below 100 instances it drowns in the noise.
            per_instance = (
                f"{(new.cpu_seconds - base.cpu_seconds) / (size - sizes[0]) * 1e6:.2f}"
                if size >= 100
                else "-"
            )
            lines.append(
                f"| {latency:g} ms | {size} | {new.round_trips:g} | {old.round_trips:g} "
                f"| {fmt_ms(new.seconds)} | {fmt_ms(old.seconds)} "
                f"| {old.seconds / new.seconds:.1f}x | {per_instance} |"
            )
    lines += ["", "### Commits (update N rows, flush, commit)", ""]
    lines.append(
        "| database | latency | rows | round trips flush+commit: alkey | durable | 0.3 "
        "| ms: no alkey | ms: alkey | ms: durable | ms: 0.3 | alkey / no alkey "
        "| durable / no alkey | bump / flush |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (database, latency, name, size), (plain_flush, plain_commit) in results.commits.items():
        if name != "no alkey":
            continue
        new_flush, new_commit = results.commits[(database, latency, "alkey", size)]
        durable_flush, durable_commit = results.commits[(database, latency, "alkey durable", size)]
        old_flush, old_commit = results.commits[(database, latency, "alkey 0.3", size)]
        plain = plain_flush.seconds + plain_commit.seconds
        with_alkey = new_flush.seconds + new_commit.seconds
        durable = durable_flush.seconds + durable_commit.seconds
        original = old_flush.seconds + old_commit.seconds
        bump = max(new_commit.seconds - plain_commit.seconds, 0.0)
        lines.append(
            f"| {database} | {latency:g} ms | {size} "
            f"| {new_flush.round_trips:g} + {new_commit.round_trips:g} "
            f"| {durable_flush.round_trips:g} + {durable_commit.round_trips:g} "
            f"| {old_flush.round_trips:g} + {old_commit.round_trips:g} "
            f"| {fmt_ms(plain)} | {fmt_ms(with_alkey)} | {fmt_ms(durable)} "
            f"| {fmt_ms(original)} | {with_alkey / plain:.2f}x | {durable / plain:.2f}x "
            f"| {bump / new_flush.seconds:.0%} |"
        )
    lines += [
        "",
        f"Read-only commit round trips: alkey {results.read_only.get('alkey')}, "
        f"durable {results.read_only.get('alkey durable')}, "
        f"0.3 {results.read_only.get('alkey 0.3')}.",
    ]
    return "\n".join(lines) + "\n"


def check_targets(results: Results) -> list[str]:
    """The round-trip targets; deterministic, so CI can hold them."""
    failures = []
    for (_, name, size), sample in results.keys.items():
        if name == "alkey" and sample.round_trips != 1:
            failures.append(f"key of {size} instance(s): {sample.round_trips:g} round trips")
    most = {"alkey": 1, "alkey durable": 2}  # durable: the intent, then the bump
    for (database, _, name, size), (flush, commit) in results.commits.items():
        if name in most and (flush.round_trips != 0 or commit.round_trips > most[name]):
            failures.append(
                f"{database} {name} commit of {size} row(s): flush {flush.round_trips:g}, "
                f"commit {commit.round_trips:g} round trips"
            )
    for name in most:
        if results.read_only.get(name) != 0:
            failures.append(f"{name} read-only commit: {results.read_only.get(name)} round trips")
    return failures


def plot(results: Results, sizes: list[int], latencies: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    styles = {"alkey": "-o", "alkey 0.3": "--s"}
    for latency in latencies:
        for name, style in styles.items():
            times = [results.keys[(latency, name, size)].seconds * 1000 for size in sizes]
            axes.plot(sizes, times, style, label=f"{name}, +{latency:g} ms network")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("model instances in one cache key")
    axes.set_ylabel("time per key generation (ms)")
    axes.set_title("Cache key generation: alkey vs the algorithm of alkey 0.3")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


README = DOCS.parent / "README.md"
START, END = "<!-- benchmark results: start -->", "<!-- benchmark results: end -->"


def update_readme(table: str) -> None:
    """Replace the README's results between its markers with this run's tables."""
    text = README.read_text(encoding="utf-8")
    before, found, rest = text.partition(START)
    _, found_end, after = rest.partition(END)
    if not (found and found_end):
        print(f"README.md has no {START} ... {END} markers; left unchanged", file=sys.stderr)
        return
    body = table.replace("### ", "#### ")
    README.write_text(f"{before}{START}\n{body}{END}{after}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small sizes, check targets only")
    parser.add_argument("--database", action="append", help="sqlite or a SQLAlchemy URL")
    args = parser.parse_args(argv)
    if args.smoke:
        key_sizes, commit_sizes, latencies = [1, 10, 100], [1, 100], [0.0]
        databases = args.database or ["sqlite"]
    else:
        key_sizes, commit_sizes, latencies = [1, 10, 100, 1000], [1, 100, 10_000], [0.0, 1.0]
        databases = args.database or (
            ["sqlite", POSTGRES_URL] if postgres_available() else ["sqlite"]
        )
    results = Results()
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as workdir:
        for latency in latencies:
            with redis_at(latency, server) as url:
                for database in databases:
                    engine = engine_for(database, Path(workdir))
                    label = "PostgreSQL" if database.startswith("postgresql") else "SQLite"
                    if database == databases[0]:
                        bench_keys(url, latency, key_sizes, engine, results)
                    bench_commits(url, latency, label, commit_sizes, engine, results)
                    Base.metadata.drop_all(engine)
                    engine.dispose()
    table = report(results, key_sizes, latencies)
    print(table)
    failures = check_targets(results)
    if not args.smoke:
        DOCS.mkdir(exist_ok=True)
        (DOCS / "benchmarks.md").write_text(
            "# Benchmarks\n\nGenerated by `make bench` (`python -m benchmarks`).\n\n" + table,
            encoding="utf-8",
        )
        plot(results, key_sizes, latencies, DOCS / "benchmarks.png")
        update_readme(table)
    if failures:
        print("round-trip targets missed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(
        "round-trip targets met: 1 per key, 0 per flush, <= 1 per commit (durable: 2), 0 read-only"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
