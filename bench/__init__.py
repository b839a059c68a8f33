"""Benchmarks of the federation: `make bench` (figures, not tests)."""
