"""The metrics exporters count what a real store does, in the real libraries.

Each test drives a real :class:`~alkey.tokens.RedisTokenStore` against a real Redis (the
session's, or a private redis-server stopped and started for an outage) and reads the
counts back the way a monitoring system would: Prometheus from a ``CollectorRegistry``,
OpenTelemetry through the SDK's ``InMemoryMetricReader``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from prometheus_client import CollectorRegistry, generate_latest

from alkey.embedded import EmbeddedRedis
from alkey.metrics import ROUND_TRIP_BUCKETS
from alkey.metrics.otel import OpenTelemetryObserver
from alkey.metrics.prometheus import PrometheusObserver
from alkey.observers import LoggingObserver
from alkey.tokens import RedisClient, RedisTokenStore

ROW = "alkey:users#1"
TABLE = "alkey:users#*"


def quick_client(url: str) -> RedisClient:
    client: RedisClient = redis.Redis.from_url(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    )
    return client


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to stop and start."""
    with EmbeddedRedis() as server:
        yield server


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} is not exported"
    return value


def test_prometheus_counts_fetches_bumps_and_a_forced_miss(
    private_redis: EmbeddedRedis,
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, retry_interval=0, observers=[metrics])
    try:
        store.fetch([ROW, TABLE])
        store.fetch([ROW])
        store.bump([ROW, TABLE])
        assert sample(registry, "alkey_fetches_total", result="hit") == 2
        assert sample(registry, "alkey_fetches_total", result="miss") == 0
        assert sample(registry, "alkey_tokens_bumped_total") == 2
        assert sample(registry, "alkey_bumps_replayed_total") == 0

        private_redis.stop()
        store.fetch([ROW])  # Redis is down: fresh random tokens
        assert sample(registry, "alkey_fetches_total", result="miss") == 1
        assert sample(registry, "alkey_fetches_total", result="hit") == 2
    finally:
        client.close()
    exposition = generate_latest(registry).decode()
    assert "# HELP alkey_fetches_total Token fetches" in exposition
    assert "# TYPE alkey_bumps_pending gauge" in exposition


def test_prometheus_times_each_round_trip_by_operation_and_result(
    private_redis: EmbeddedRedis,
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, durable=True, retry_interval=60, observers=[metrics])
    try:
        began = time.perf_counter()
        for _ in range(3):
            store.fetch([ROW, TABLE])
        intent = store.intend([ROW])
        store.bump([ROW], intent=intent)
        elapsed = time.perf_counter() - began
        for operation, count in (("fetch", 3), ("intend", 1), ("bump", 1)):
            labels = {"operation": operation, "result": "ok"}
            assert sample(registry, "alkey_round_trip_seconds_count", **labels) == count
            assert 0 < sample(registry, "alkey_round_trip_seconds_sum", **labels) <= elapsed
            assert sample(registry, "alkey_round_trip_seconds_bucket", le="5.0", **labels) == count
        private_redis.stop()
        store.fetch([ROW])
        failed = {"operation": "fetch", "result": "error"}
        assert sample(registry, "alkey_round_trip_seconds_count", **failed) == 1
        assert (
            sample(registry, "alkey_round_trip_seconds_count", operation="fetch", result="ok") == 3
        )
    finally:
        client.close()
    exposition = generate_latest(registry).decode()
    assert "# TYPE alkey_round_trip_seconds histogram" in exposition
    assert 'alkey_round_trip_seconds_bucket{le="0.0001",operation="fetch",result="ok"}' in (
        exposition
    )


def test_prometheus_shows_an_outage_and_its_end_and_the_replayed_bumps(
    private_redis: EmbeddedRedis,
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(
        client, retry_interval=0, max_pending=2, observers=[LoggingObserver(), metrics]
    )
    try:
        store.fetch([ROW])
        assert sample(registry, "alkey_outage") == 0
        private_redis.stop()
        store.bump([ROW, TABLE])  # kept for replay
        assert sample(registry, "alkey_outage") == 1
        assert sample(registry, "alkey_outages_total", kind="outage") == 1
        assert sample(registry, "alkey_outages_total", kind="misconfiguration") == 0
        assert sample(registry, "alkey_bumps_pending") == 2
        store.bump(["alkey:users#2"])  # past max_pending=2
        assert sample(registry, "alkey_bumps_dropped_total") == 1
        assert sample(registry, "alkey_tokens_bumped_total") == 0

        private_redis.start()
        store.fetch([ROW])  # carries the kept bumps in front
        assert store.wait_replayed(timeout=5)
        assert sample(registry, "alkey_outage") == 0
        assert sample(registry, "alkey_bumps_pending") == 0
        assert sample(registry, "alkey_outages_total", kind="outage") == 1
        replayed = sample(registry, "alkey_bumps_replayed_total")
        assert replayed == 3, "the kept bumps, and the global token for the dropped one"
        # The background replay and the fetch may both have sent them: each kept bump is
        # replayed once, and a second sending is counted as the bump it is.
        assert sample(registry, "alkey_tokens_bumped_total") >= replayed
    finally:
        client.close()


def test_prometheus_tells_a_misconfiguration_from_an_outage(redis_url: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    client = quick_client(redis_url.rsplit("/", 1)[0] + "/99")  # no such database
    try:
        RedisTokenStore(client, observers=[metrics]).fetch([ROW])
    finally:
        client.close()
    assert sample(registry, "alkey_outages_total", kind="misconfiguration") == 1
    assert sample(registry, "alkey_outages_total", kind="outage") == 0
    assert sample(registry, "alkey_fetches_total", result="miss") == 1


def test_prometheus_counts_the_local_token_cache(redis_url: str, redis_client: Any) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    store = RedisTokenStore(redis_client, local_cache=100, observers=[metrics])
    try:
        deadline = time.monotonic() + 5
        while not registry.get_sample_value("alkey_local_cache_lookups_total", {"result": "hit"}):
            assert time.monotonic() < deadline, "the local token cache never answered"
            store.fetch([ROW, TABLE])
            time.sleep(0.01)
        assert sample(registry, "alkey_local_cache_lookups_total", result="miss") >= 2
        store.bump([ROW])
        assert sample(registry, "alkey_local_cache_invalidations_total") >= 1
        assert sample(registry, "alkey_local_cache_evictions_total") >= 1
    finally:
        store.close_local_cache()
    flushes = [
        s
        for metric in registry.collect()
        if metric.name == "alkey_local_cache_flushes"
        for s in metric.samples
        if s.name == "alkey_local_cache_flushes_total"
    ]
    assert sum(s.value for s in flushes) >= 1
    assert {s.labels["reason"] for s in flushes} >= {"the cache was closed"}


def test_one_observer_can_watch_two_stores(redis_client: Any) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusObserver(registry)
    first = RedisTokenStore(redis_client, observers=[metrics])
    second = RedisTokenStore(redis_client, key_prefix="other:")
    second.add_observer(metrics)
    first.fetch([ROW])
    second.fetch([ROW])
    second.bump([ROW, TABLE])
    assert sample(registry, "alkey_fetches_total", result="hit") == 2
    assert sample(registry, "alkey_tokens_bumped_total") == 2


def test_a_second_observer_on_the_same_registry_is_refused_clearly() -> None:
    registry = CollectorRegistry()
    PrometheusObserver(registry)
    with pytest.raises(ValueError, match="already registered in this Prometheus registry"):
        PrometheusObserver(registry)
    # The refused one left nothing behind, and another namespace is welcome.
    PrometheusObserver(registry, namespace="other")
    assert registry.get_sample_value("other_fetches_total", {"result": "hit"}) == 0


def test_the_default_registry_is_prometheus_clients() -> None:
    from prometheus_client import REGISTRY

    metrics = PrometheusObserver(namespace="alkey_test_default")
    try:
        assert metrics.registry is REGISTRY
        assert REGISTRY.get_sample_value("alkey_test_default_outage") == 0
    finally:
        for metric in metrics._registered:
            REGISTRY.unregister(metric)


def otel_points(
    reader: InMemoryMetricReader,
) -> dict[tuple[str, tuple[tuple[str, Any], ...]], float]:
    """Every data point the reader collects, by instrument name and attributes."""
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        continue  # see otel_histograms()
                    assert isinstance(point, NumberDataPoint)
                    attributes = tuple(sorted((point.attributes or {}).items()))
                    points[metric.name, attributes] = point.value
    return points


def otel_histograms(
    reader: InMemoryMetricReader,
) -> dict[tuple[str, tuple[tuple[str, Any], ...]], HistogramDataPoint]:
    """Every histogram data point the reader collects, by instrument name and attributes."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        (metric.name, tuple(sorted((point.attributes or {}).items()))): point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
        if isinstance(point, HistogramDataPoint)
    }


def test_opentelemetry_records_the_same_counts_through_an_in_memory_reader(
    private_redis: EmbeddedRedis,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = OpenTelemetryObserver(meter_provider=provider)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, retry_interval=0, observers=[metrics])
    try:
        store.fetch([ROW, TABLE])
        store.bump([ROW, TABLE])
        private_redis.stop()
        store.fetch([ROW])
        store.bump([ROW])
        during = otel_points(reader)
        assert during["alkey.fetches", (("result", "hit"),)] == 1
        assert during["alkey.fetches", (("result", "miss"),)] == 1
        assert during["alkey.outages", (("kind", "outage"),)] == 1
        assert during["alkey.outage", ()] == 1
        assert during["alkey.bumps.pending", ()] == 1
        private_redis.start()
        store.fetch([ROW])
        assert store.wait_replayed(timeout=5)
        after = otel_points(reader)
        assert after["alkey.outage", ()] == 0
        assert after["alkey.bumps.pending", ()] == 0
        assert after["alkey.bumps.replayed", ()] == 1
        # The two bumped before, and the replay -- sent twice when the background replay
        # and the fetch both carried it, each sending a bump (the replay counted once).
        assert after["alkey.tokens.bumped", ()] in (3, 4)
    finally:
        client.close()
        provider.shutdown()


def test_opentelemetry_times_round_trips_in_seconds_with_alkeys_buckets(
    private_redis: EmbeddedRedis,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics = OpenTelemetryObserver(meter_provider=provider)
    client = quick_client(private_redis.url)
    store = RedisTokenStore(client, retry_interval=60, observers=[metrics])
    try:
        began = time.perf_counter()
        store.fetch([ROW, TABLE])
        store.fetch([ROW])
        store.bump([ROW])
        elapsed = time.perf_counter() - began
        private_redis.stop()
        store.bump([TABLE])  # the round trip fails; the bump is kept
        histograms = otel_histograms(reader)
        name = "alkey.round_trip"
        fetches = histograms[name, (("operation", "fetch"), ("result", "ok"))]
        assert fetches.count == 2
        assert 0 < fetches.sum <= elapsed
        assert tuple(fetches.explicit_bounds) == ROUND_TRIP_BUCKETS
        assert histograms[name, (("operation", "bump"), ("result", "ok"))].count == 1
        assert histograms[name, (("operation", "bump"), ("result", "error"))].count == 1
    finally:
        client.close()
        provider.shutdown()


def test_opentelemetry_uses_the_global_meter_by_default() -> None:
    from opentelemetry import metrics

    observer = OpenTelemetryObserver()
    assert observer.meter is not None
    observer.fetched(identifiers=[ROW], missed=False)  # the no-op provider takes it
    assert metrics.get_meter_provider() is not None
