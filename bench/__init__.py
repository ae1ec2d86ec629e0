"""Benchmarks: one CLI, ``python -m bench.run NAME`` (see bench/run.py)."""
