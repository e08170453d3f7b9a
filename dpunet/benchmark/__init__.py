"""Benchmarks that back the performance claims in documentation/performance.md.

`dpunet_bench_engine` (dpunet.benchmark.engine_bench) times a full DP-SGD step with each per-patient gradient
engine against a plain non-private step on the same U-Net, device and precision.
"""
