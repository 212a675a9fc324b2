"""Throughput benchmarks (not tests): ``python -m benchmarks --help``; see docs/performance.md."""
