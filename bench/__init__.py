"""Benchmarks: scripts that print numbers and ratios (never timing asserts in tests)."""
