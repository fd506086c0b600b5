"""Benchmarks: clamped entropy (topk=64, clamp_p=0.3): this package and the materialized reference."""
from _suite import run_benchmark

FAMILY = "clamped_entropy"


def test_clamped_entropy(benchmark, provider, bench_case, bench_device):
    run_benchmark(benchmark, provider, bench_case, bench_device, FAMILY)
