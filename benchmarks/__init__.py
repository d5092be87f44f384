"""Benchmark scripts: each prints a side-by-side ratio against a peer, last line JSON."""
