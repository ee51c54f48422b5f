"""Benchmarks for alkey: run ``python -m benchmarks`` (see README, "Performance")."""
