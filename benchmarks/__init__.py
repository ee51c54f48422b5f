"""Benchmarks for alkey: run ``python -m benchmarks`` (see docs/performance.md)."""
