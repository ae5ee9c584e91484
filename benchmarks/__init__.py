"""Kernel and end-to-end benchmarks (run as modules: python -m benchmarks.bench_kernels)."""
