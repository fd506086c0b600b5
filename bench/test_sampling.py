"""Benchmarks: sampling replay (vLLM top-k / top-p / min-p truncation) next to the plain fused row."""
from _suite import run_benchmark

FAMILY = "sampling"


def test_sampling(benchmark, provider, bench_case, bench_device):
    run_benchmark(benchmark, provider, bench_case, bench_device, FAMILY)
