"""Benchmarks: they print tables and write JSON under bench/results/ and assert nothing; the one
check among them, bench.compile_sm90, exits 1 when a kernel variant does not compile for Hopper."""
