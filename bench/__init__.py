"""Benchmarks: they print tables and write JSON under bench/results/; they assert nothing."""
