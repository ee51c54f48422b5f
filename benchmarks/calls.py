"""A CPU guard that cannot flake: the calls alkey's own code makes, and the lines it runs.

Why counts rather than time: CI machines are shared and their timings vary by tens of
percent from one run to the next, so a time budget would either flake or be too loose to
catch anything. What alkey's code does for one key or one commit is exact and the same on
every run, and it moves with alkey's CPU. Two counts, because each misses what the other
sees:

* calls -- Python frames of alkey's code entered: a helper called per row, an extra pass,
  a cache that stopped hitting. But the per-instance work of a key runs in loops and
  comprehensions inside one function, so a key makes the same calls for 1 instance as
  for 100, and more work per instance would not show;
* lines -- lines of alkey's code executed, each time it runs: a loop body or a
  comprehension over N instances counts N times, so a slower path per instance or per
  row shows as more lines, in proportion.

Neither sees work in C, in SQLAlchemy or redis-py beyond alkey's calls into them, or in
Redis: lines are not instructions, and the timed run is there for the rest. Both are
counted with one :func:`sys.settrace` hook (see :class:`Counter`) for code objects whose
file lies in the installed ``alkey`` package, after warm-up calls have loaded the scripts
and learnt the mappers, and with the garbage collector off, so that no finalizer runs
inside. The counts depend on the Python version (3.12 inlines comprehensions: fewer calls,
other lines), so the budgets name the version they were counted on and are checked only
there (elsewhere the counts are reported).

The budgets live in ``benchmarks/budgets.json`` (``{"python": "3.11", "operations":
{operation: {"calls": most, "lines": most}}}``); ``python -m benchmarks --update-budgets``
rewrites it from the current counts plus a margin, for a change that costs calls or lines
on purpose.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
from sqlalchemy.orm import Session, sessionmaker

import alkey
from alkey.keys import CacheKeyGenerator
from alkey.tokens import RedisTokenStore
from benchmarks.workload import Transaction, engine_for, load, read_only, seed

if TYPE_CHECKING:
    from _typeshed import TraceFunction  # what sys.settrace takes; stubs only

BUDGETS = Path(__file__).resolve().parent / "budgets.json"
#: Where alkey's code lives: code objects compiled from files under it are counted.
ALKEY_DIR = str(Path(alkey.__file__).parent) + os.sep
#: Headroom --update-budgets leaves above the counts: small, so that a real regression
#: still fails, but enough for a harmless refactoring.
MARGIN = 0.10
#: Untimed calls of each operation before counting (a first key loads the fetch script,
#: a first commit the bump script and alkey's per-mapper plans, ...).
WARMUP = 3
#: Counted calls of each operation, of which the fewest is kept (see :func:`steady_counts`).
COUNTS = 3

KEY_SIZES = (1, 10, 100)
OPERATIONS = (
    *(f"key, {n} instance{'s' if n > 1 else ''}" for n in KEY_SIZES),
    "commit, 1 row",
    "commit, 100 rows",
    "read-only transaction",
)


class Counts(NamedTuple):
    """What alkey's own code did in one operation."""

    #: Python frames entered (calls, generator resumptions, comprehensions before 3.12).
    calls: int
    #: Lines executed: a line run once per instance counts once per instance.
    lines: int


#: What a budget holds, per operation: the fields of :class:`Counts`.
METRICS: tuple[str, ...] = Counts._fields


class Counter:
    """``with Counter() as counter: ...; counter.counts`` -- alkey's calls and lines.

    One :func:`sys.settrace` hook counts both: its global function sees every frame being
    entered and counts those of alkey's code as calls, and it traces only those frames,
    whose ``line`` events it counts -- so that SQLAlchemy, redis-py and the rest run
    without a line tracer and alkey's count does not depend on them. Before Python 3.12 a
    comprehension is a frame of its own (a call, traced like any other); from 3.12 it is
    inlined, and its lines are events of the enclosing frame: either way every iteration
    of a loop or a comprehension over the instances is counted, which the calls alone do
    not see.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.lines = 0
        self._ours: dict[CodeType, bool] = {}
        self._previous: TraceFunction | None = None

    @property
    def counts(self) -> Counts:
        return Counts(self.calls, self.lines)

    def _enter(self, frame: FrameType, event: str, arg: Any) -> TraceFunction | None:
        if event != "call":
            return None
        code = frame.f_code
        ours = self._ours.get(code)
        if ours is None:
            ours = self._ours[code] = code.co_filename.startswith(ALKEY_DIR)
        if not ours:
            return None
        self.calls += 1
        return self._line

    def _line(self, frame: FrameType, event: str, arg: Any) -> TraceFunction:
        if event == "line":
            self.lines += 1
        return self._line

    def __enter__(self) -> Counter:
        gc.collect()
        gc.disable()
        self._previous = sys.gettrace()
        sys.settrace(self._enter)
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.settrace(self._previous)
        gc.enable()


def counts_of(operation: Callable[[], object]) -> Counts:
    with Counter() as counter:
        operation()
    return counter.counts


def steady_counts(operation: Callable[[], object]) -> Counts:
    """The calls and lines of one ``operation`` on its steady path: for each, the fewest
    of :data:`COUNTS` calls in a row.

    Why the fewest: alkey does some upkeep by the clock, not per call (the catalog looks
    for relationships added to configured mappers at most every quarter of a second), and
    whether that falls inside a counted call depends on timing. Calls in a row take tens of
    milliseconds at most, even traced, so such upkeep lands in one of them at most, and the
    fewest is the same on every run; upkeep that ran on every call would still be in all of
    them. Calls and lines are each the fewest of their own, which is the same when upkeep
    lands in one call: that call has more of both.
    """
    counted = [counts_of(operation) for _ in range(COUNTS)]
    return Counts(*(min(values) for values in zip(*counted, strict=True)))


def count_operations(redis_url: str, workdir: Path) -> dict[str, Counts]:
    """alkey's calls and lines for each of :data:`OPERATIONS`, on SQLite and the Redis at
    ``redis_url``."""
    engine = engine_for("sqlite", workdir, "calls")
    seed(engine, 1, 1 + max(KEY_SIZES) + 100)
    client = redis.Redis.from_url(redis_url)  # not alkey.testing's: its calls are not alkey's
    factory: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)
    alkey.bind(factory, tokens=RedisTokenStore(client))
    sessions = [factory() for _ in range(3)]
    try:
        generator = CacheKeyGenerator(client)
        instances = load(sessions[0], 1, max(KEY_SIZES))
        operations: dict[str, Callable[[], object]] = {
            key_operation(size): partial(generator, *instances[:size], "fragment")
            for size in KEY_SIZES
        }
        first = 1 + max(KEY_SIZES)
        operations["commit, 1 row"] = Transaction(sessions[1], load(sessions[1], first, 1), "c")
        operations["commit, 100 rows"] = Transaction(
            sessions[2], load(sessions[2], first + 1, 100), "c"
        )
        operations["read-only transaction"] = read_only(factory)
        for _ in range(WARMUP):
            for operation in operations.values():
                operation()
        return {name: steady_counts(operation) for name, operation in operations.items()}
    finally:
        for session in sessions:
            session.close()
        alkey.unbind(factory)
        client.close()
        engine.dispose()


def per_instance(counts: dict[str, Counts], metric: str) -> float:
    """The marginal ``metric`` per instance of a key, between its second and largest sizes
    (from the second: a key of one instance may take a path of its own)."""
    small, large = KEY_SIZES[1], KEY_SIZES[-1]
    extra = metric_of(counts[key_operation(large)], metric) - metric_of(
        counts[key_operation(small)], metric
    )
    return extra / (large - small)


def key_operation(size: int) -> str:
    return OPERATIONS[KEY_SIZES.index(size)]


def metric_of(counts: Counts, metric: str) -> int:
    value: int = getattr(counts, metric)
    return value


#: operation -> metric -> most allowed, as ``budgets.json`` holds them.
Budgets = dict[str, dict[str, int]]


#: The Python the counts are taken on (major.minor): the budgets hold for it alone.
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def counted_on(path: Path = BUDGETS) -> str | None:
    """The Python the budgets in ``path`` were counted on (None: no budgets yet)."""
    if not path.exists():
        return None
    python: str | None = json.loads(path.read_text(encoding="utf-8")).get("python")
    return python


def load_budgets(path: Path = BUDGETS) -> Budgets:
    """The budgets, if they were counted on the running Python; else none.

    Counts differ between Python versions -- each compiles its own bytecode, and 3.12
    inlines comprehensions -- so budgets counted on another one would fail or pass for
    reasons that are not alkey's: CI counts on the version the budgets name.
    """
    if counted_on(path) != PYTHON:
        return {}
    budgets: Budgets = json.loads(path.read_text(encoding="utf-8"))["operations"]
    return budgets


def write_budgets(counts: dict[str, Counts], path: Path = BUDGETS) -> Budgets:
    """Each count plus :data:`MARGIN`, rounded up, as the new budgets of this Python."""
    budgets = {
        name: {metric: math.ceil(metric_of(count, metric) * (1 + MARGIN)) for metric in METRICS}
        for name, count in counts.items()
    }
    data = {"python": PYTHON, "operations": budgets}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return budgets


def budget_of(budgets: Budgets, name: str, metric: str) -> int | None:
    return budgets.get(name, {}).get(metric)


def over_budget(counts: dict[str, Counts], budgets: Budgets) -> list[str]:
    """A message for each operation and metric whose count is over its budget, or has
    none: a metric without a budget would guard nothing, silently."""
    update = "`python -m benchmarks --update-budgets`"
    python = counted_on()
    if python is not None and python != PYTHON:
        print(
            f"{BUDGETS.name} was counted on Python {python}, this is {PYTHON}: alkey's "
            "calls and lines are reported, not checked",
            file=sys.stderr,
        )
        return []
    failures = []
    for name, count in counts.items():
        for metric in METRICS:
            value, budget = metric_of(count, metric), budget_of(budgets, name, metric)
            if budget is None:
                failures.append(
                    f"{name}: {value} {metric}, and no budget for its {metric} in "
                    f"{BUDGETS.name}; run {update} to add one"
                )
            elif value > budget:
                failures.append(
                    f"{name}: {value} {metric} of alkey's code, over its budget of {budget} "
                    f"{metric} ({BUDGETS.name}). If the extra {metric} are intended, run "
                    f"{update} and commit the new budgets; if not, alkey got slower here"
                )
    return failures


def standing(count: int, budget: int | None) -> str:
    """How a count stands against its budget; "slack" when a budget no longer guards much
    (the count fell well below it: tighten it with --update-budgets)."""
    if budget is None:
        return "no budget"
    if count > budget:
        return "**over**"
    return "slack" if count * (1 + 2 * MARGIN) < budget else "within"


def report(counts: dict[str, Counts], budgets: Budgets) -> str:
    def cells(name: str, count: Counts) -> str:
        row = []
        for metric in METRICS:
            value, budget = metric_of(count, metric), budget_of(budgets, name, metric)
            shown = "-" if budget is None else str(budget)
            row.append(f"{value} | {shown} | {standing(value, budget)}")
        return " | ".join(row)

    sizes = f"{KEY_SIZES[1]} to {KEY_SIZES[-1]} instances"
    lines = [
        "| operation | calls | budget | | lines | budget | |",
        "|---|---:|---:|---|---:|---:|---|",
        *(f"| {name} | {cells(name, count)} |" for name, count in counts.items()),
        "",
        f"Marginal per instance of a key ({sizes}): "
        f"{per_instance(counts, 'calls'):.2f} calls, {per_instance(counts, 'lines'):.2f} lines.",
    ]
    return "\n".join(lines) + "\n"
