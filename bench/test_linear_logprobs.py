"""Benchmarks: linear_logprobs (entropy on and off): this package, the reference, torch.compile of it, TRL ChunkedLogProbFunction, Liger FusedLinearScaledCE(return_entropy)."""
from _suite import run_benchmark

FAMILY = "linear_logprobs"


def test_linear_logprobs(benchmark, provider, bench_case, bench_device):
    run_benchmark(benchmark, provider, bench_case, bench_device, FAMILY)
