"""Benchmarks and the cluster simulator; run from the repository root."""
