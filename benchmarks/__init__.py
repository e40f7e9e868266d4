"""Benchmark scripts: `python -m benchmarks.NAME`; each prints a table and writes JSON."""
