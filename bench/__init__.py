"""Benchmarks: one script per measurement, each writing a section of bench/RESULTS.md (see README.md)."""
