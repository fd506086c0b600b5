"""Benchmarks: logprobs_from_logits: this package, the reference, TRL selective_log_softmax_and_entropy (CUDA)."""
from _suite import run_benchmark

FAMILY = "logits"


def test_logprobs_from_logits(benchmark, provider, bench_case, bench_device):
    run_benchmark(benchmark, provider, bench_case, bench_device, FAMILY)
