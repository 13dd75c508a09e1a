"""Benchmarks and the small random-init models that demo, tests and benchmarks share."""
