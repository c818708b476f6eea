"""Benchmarks: ``python -m benchmarks.attribution`` times the attribution and evaluation passes."""
