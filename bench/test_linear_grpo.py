"""Benchmarks: LinearGRPOLoss with the entropy bonus next to Liger's LigerFusedLinearGRPOLoss (no entropy), TRL's ChunkedLogProbFunction path and the eager reference."""
from _suite import run_benchmark

FAMILY = "grpo"


def test_linear_grpo(benchmark, provider, bench_case, bench_device):
    run_benchmark(benchmark, provider, bench_case, bench_device, FAMILY)
