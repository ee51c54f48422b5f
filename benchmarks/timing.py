"""How the benchmark times things: interleaved, rotated rounds of batched calls.

Why this shape: absolute times on a shared machine drift by tens of percent within a
minute (other processes, CPU frequency, the page cache), which is more than the
differences the benchmark is after. So the variants of one comparison are never timed one
after the other, but in rounds: every round times one batch of every variant, and the
round's ratios (each variant's time over its floor's, from the same round) are what is
summarised -- drift that lasts longer than a round cancels out of them. The order within a
round rotates (round ``r`` starts with variant ``r mod k``), and every other cycle of ``k``
rounds runs backwards, so that no variant is always first when the caches are cold, or
last, and none always runs right after the same neighbour.

Each batch is several calls, so that timer resolution and per-batch costs do not matter;
the garbage collector is run before each batch and disabled during it, so that a
collection triggered by one variant's garbage is never billed to another. Wall time is
what is compared; the CPU time of the calling thread (not the latency proxy's threads,
not Redis's or the database's processes) is kept alongside.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from alkey.testing import CountingConnection


@dataclass
class Variant:
    """One side of a comparison: a call without arguments, timed ``batch`` calls at a time.

    ``laps``, if given, is a dict the call itself adds seconds (or counts) to, per phase;
    the timing loop empties it before each batch and keeps its per-call averages.
    """

    name: str
    call: Callable[[], object]
    laps: dict[str, float] | None = None
    batch: int = 1


@dataclass(frozen=True)
class Batch:
    """One timed batch of one variant, per call: wall and thread-CPU seconds, round trips
    (requests sent on counting connections), and the call's own laps; and its size."""

    calls: int
    wall: float
    cpu: float
    trips: float
    laps: dict[str, float] = field(default_factory=dict)


#: A comparison's measurements: each variant's batches, one per round, in round order.
Series = dict[str, list[Batch]]


@dataclass(frozen=True)
class Rounds:
    """How long to measure one comparison.

    Each variant's batch is sized so that it takes about ``target`` seconds (at most
    ``max_batch`` calls); then as many rounds are run as fit in ``budget`` seconds, but at
    least ``least`` and at most ``most``: slow comparisons get fewer rounds, fast ones
    enough for a stable median. ``warmup`` calls of each variant come first (scripts
    loaded, statements compiled, tokens created), untimed.
    """

    target: float
    budget: float
    least: int
    most: int
    max_batch: int = 1000
    warmup: int = 3


def run_batch(variant: Variant) -> Batch:
    """Time one batch of ``variant`` with the garbage collector out of the way."""
    call, calls, laps = variant.call, variant.batch, variant.laps
    if laps is not None:
        laps.clear()
    gc.collect()
    gc.disable()
    try:
        trips = CountingConnection.requests
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            call()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        trips = CountingConnection.requests - trips
    finally:
        gc.enable()
    per_call = {name: value / calls for name, value in (laps or {}).items()}
    return Batch(calls, wall / calls, cpu / calls, trips / calls, per_call)


def calibrate(variants: Sequence[Variant], rounds: Rounds) -> int:
    """Warm every variant up, size its batch, and return how many rounds to run."""
    for _ in range(rounds.warmup):
        for variant in variants:
            variant.call()
    started = time.perf_counter()
    gc.collect()
    collection = time.perf_counter() - started
    cost = 0.0
    for variant in variants:
        seconds = per_call_estimate(variant, rounds)
        variant.batch = max(1, min(rounds.max_batch, round(rounds.target / seconds)))
        cost += variant.batch * seconds + collection
    return max(rounds.least, min(rounds.most, int(rounds.budget / cost)))


def per_call_estimate(variant: Variant, rounds: Rounds) -> float:
    """Seconds per call of ``variant``, from a batch that lasted at least half the target.

    Why not from one call: the first call after a collection runs with cold CPU caches
    and would make the batches too small; so the batch grows until it is long enough.
    """
    variant.batch = 1
    while True:
        seconds = run_batch(variant).wall
        if seconds * variant.batch >= rounds.target / 2 or variant.batch >= rounds.max_batch:
            return seconds
        wanted = math.ceil(rounds.target / 2 / max(seconds, 1e-7))
        variant.batch = min(rounds.max_batch, max(2 * variant.batch, wanted))


def interleave(variants: Sequence[Variant], rounds: int) -> Series:
    """``rounds`` rounds of one batch of every variant: round ``r`` starts with variant
    ``r mod k``, in the given order in even cycles of ``k`` rounds and backwards in odd ones
    (rotation alone leaves each variant after the same neighbour in ``k - 1`` of ``k``
    rounds)."""
    series: Series = {variant.name: [] for variant in variants}
    count = len(variants)
    for number in range(rounds):
        first = number % count
        order = [*variants[first:], *variants[:first]]
        if (number // count) % 2:
            order.reverse()
        for variant in order:
            series[variant.name].append(run_batch(variant))
    return series


@dataclass(frozen=True)
class Spread:
    """A median and the interquartile range around it (the 25th and 75th percentiles)."""

    median: float
    low: float
    high: float

    def scaled(self, factor: float) -> Spread:
        return Spread(self.median * factor, self.low * factor, self.high * factor)


def spread(values: Iterable[float]) -> Spread:
    """The median and quartiles of ``values`` (inclusive method: within their range)."""
    data = sorted(values)
    if len(data) < 2:
        return Spread(data[0], data[0], data[0])
    low, _, high = statistics.quantiles(data, n=4, method="inclusive")
    return Spread(statistics.median(data), low, high)


def wall(batch: Batch) -> float:
    return batch.wall


def cpu(batch: Batch) -> float:
    return batch.cpu


def per_call(series: Series, name: str, metric: Callable[[Batch], float] = wall) -> Spread:
    """``metric`` per call of variant ``name``, over the rounds."""
    return spread(metric(batch) for batch in series[name])


def ratio(series: Series, name: str, floor: str, metric: Callable[[Batch], float] = wall) -> Spread:
    """``name`` over ``floor``: the ratio of each round, then their median and quartiles."""
    return spread(metric(a) / metric(b) for a, b in zip(series[name], series[floor], strict=True))


def rounds_of(series: Series) -> int:
    return len(next(iter(series.values())))
