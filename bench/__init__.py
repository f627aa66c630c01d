"""Benchmarks of the presence service against a port of the seed's design (see BENCHMARKS.md)."""
