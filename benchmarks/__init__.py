"""Benchmark scripts: `python benchmarks/NAME.py`; each prints a table and writes JSON."""
