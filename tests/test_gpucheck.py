"""``fused-entropy gpucheck``: argument errors, the results file and the summary.

The full quick run (every section, on CPU through the interpreter) is part of ``.ci/run``; here
the driver's contract is checked on a cheap section.
"""
import json
import os
import subprocess
import sys

import pytest

from fused_entropy.tools import gpucheck


def run_cli(*args, interpret="1"):
    env = dict(os.environ, TRITON_INTERPRET=interpret)
    return subprocess.run([sys.executable, "-m", "fused_entropy.cli", "gpucheck", *args],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("budget", ["-1", "0", "nan"])
def test_bad_budget_is_a_clear_error(tmp_path, budget):
    r = run_cli("--out", str(tmp_path), "--budget-s", budget)
    assert r.returncode == 2
    assert "--budget-s must be a positive number of seconds" in r.stderr


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli("--out", str(blocker / "sub"), "--quick")
    assert r.returncode == 2
    assert "is not a writable folder" in r.stderr and str(blocker / "sub") in r.stderr


def test_full_check_without_a_gpu_is_a_clear_error(tmp_path):
    r = run_cli("--out", str(tmp_path), "--device", "cpu")
    assert r.returncode == 2 and "the full check needs a GPU" in r.stderr and "--quick" in r.stderr


def test_kernels_on_cpu_without_the_interpreter_is_a_clear_error(tmp_path):
    r = run_cli("--out", str(tmp_path), "--quick", "--device", "cpu", interpret="0")
    assert r.returncode == 2 and "TRITON_INTERPRET=1" in r.stderr
    # the env section alone needs no kernels
    assert run_cli("--out", str(tmp_path), "--quick", "--device", "cpu", "--sections", "env", interpret="0").returncode == 0


@pytest.mark.parametrize("args, text", [(["--sections", "env,bogus"], "--sections takes"),
                                        (["--shapes", "1,2"], "--shapes takes N,H,V"),
                                        (["--shapes", "99999999999,99999999999,99999999999"], "does not fit a GPU"),
                                        (["--budget-s", "1"], "too small to run any step")])
def test_bad_sections_and_shapes(tmp_path, args, text):
    r = run_cli("--out", str(tmp_path), *args)
    assert r.returncode == 2 and text in r.stderr


def test_env_section_writes_results_and_summary(tmp_path):
    r = run_cli("--out", str(tmp_path), "--quick", "--sections", "env", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    kinds = {(x["section"], x["kind"]) for x in recs}
    assert {("env", "info"), ("env", "ceiling"), ("gpucheck", "step")} <= kinds
    ceilings = {x["name"]: x for x in recs if x["kind"] == "ceiling"}
    assert ceilings["matmul"]["tflops"] > 0 and ceilings["copy"]["gbs"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary in r.stdout and "| env | ok |" in summary


def test_step_that_times_out_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(gpucheck.STEPS, "env", ("env", 0.5, 0.5))  # below any real start-up time
    args = gpucheck.build_parser().parse_args(["--out", str(tmp_path), "--quick", "--sections", "env"])
    rec = gpucheck.Recorder(str(tmp_path), "gpucheck")
    assert gpucheck._run_step(args, "env", 0.5, rec) == "timed out"
    summary = gpucheck.summarize(gpucheck.read_results(str(tmp_path)))
    assert "| env | timed out |" in summary


def test_perf_rows_fit_a_tiny_vocabulary_and_a_failing_row_fails_the_step(tmp_path, monkeypatch):
    import torch

    from fused_entropy.tools import bench_providers as P

    rows = gpucheck._perf_rows(P.Case(n=4, h=3, v=2), torch.device("cpu"))
    assert [r[1] for r in rows if r[0].startswith("fused-topk")] == ["fused logp + clamped H, topk=2"]

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpucheck, "_perf_rows", lambda case, device: [("x", "broken row", 1, 4, broken)])
    rec = gpucheck.Recorder(str(tmp_path), "perf")
    assert gpucheck._perf_case(None, rec, torch.device("cpu"), (4, 3, 2), None, profile=False) is False


def test_summary_of_perf_and_check_records():
    recs = [
        {"section": "perf", "kind": "perf", "shape": [8, 4, 16], "row": "floor", "label": "floor", "status": "ok",
         "fwd_ms": 1.0, "fwdbwd_ms": 4.0, "gemms_fwdbwd": 4, "tflops_fwdbwd": 1.0},
        {"section": "perf", "kind": "perf", "shape": [8, 4, 16], "row": "fused", "label": "fused", "status": "ok",
         "fwd_ms": 2.0, "fwdbwd_ms": 6.0, "gemms_fwdbwd": 4, "tflops_fwdbwd": 0.5},
        {"section": "perf", "kind": "perf", "shape": [8, 4, 16], "row": "trl", "label": "TRL", "status": "unavailable",
         "why": "No module named 'trl'"},
        {"section": "correctness", "kind": "check", "name": "x", "dtype": "bfloat16", "err": 1e-3, "torch_err": 2e-3,
         "bound": 6e-3, "ok": True},
    ]
    text = gpucheck.summarize(recs)
    assert "| 8,4,16 | fused | 2.00 | 6.00 | 4 | 0.5 | - | 1.50 |" in text
    assert "unavailable: No module named 'trl'" in text
    assert "| x | bfloat16 | 1.00e-03 |" in text


def test_summary_judges_the_targets_at_the_target_shape_only():
    shape = list(gpucheck.TARGET_SHAPE)
    row = lambda name, fwd, fwdbwd, **kw: dict(dict(kind="perf", shape=shape, dtype="bfloat16", row=name, label=name,
                                                    status="ok", fwd_ms=fwd, fwdbwd_ms=fwdbwd, gemms_fwdbwd=4,
                                                    tflops_fwdbwd=1.0, tokens=shape[0]), **kw)
    recs = [row("fused", 11.0, 45.04, mem_per_nv=0.2), row("fused-topk64", 19.8, 60.0),
            # 3/4 of the tokens in 0.8x the time: 1.067x per token, over the bound
            row("fused-grpo", 12.0, 36.03, tokens=shape[0] * 3 // 4),
            dict(kind="check", name="determinism 3 runs", fwd_max_abs=0.0, bwd_max_abs=2e-3, ok=False,
                 shape=[1000, 4096, 32003], dtype="bfloat16")]
    text = gpucheck.summarize(recs)
    assert "| forward+backward, log-prob + entropy (ms) | 45.0 | 42 | **NO** |" in text
    assert "| forward, log-prob + entropy (ms) | 11.0 | 12 | yes |" in text
    assert "| forward with clamped entropy (topk=64) / plain forward | 1.80 | 1.6 | **NO** |" in text
    assert "forward+backward | 1.07 | 1.05 | **NO** |" in text
    assert "| working memory / one [N, V] bf16 buffer, forward+backward | 0.20 | 0.5 | yes |" in text
    assert "determinism, from the correctness step (bfloat16 at (1000, 4096, 32003); on a CPU" in text
    assert "3 runs: **NO**" in text
    on_gpu = gpucheck.summarize([dict(kind="info", device="cuda:0", gpu="NVIDIA H200")] + recs)
    assert "(bfloat16 at (1000, 4096, 32003)): forward" in on_gpu and "this run is on" not in on_gpu
    # another shape, or fp32, is never judged against the targets
    other = [dict(r, shape=[4096, 2048, 32768]) for r in recs[:3]] + [dict(recs[0], dtype="float32")]
    not_judged = gpucheck.summarize(other)
    assert "not judged: no plain fused perf row" in not_judged and "without `--quick`" in not_judged
    assert "| forward, log-prob + entropy (ms) | 12 |" in not_judged  # the bounds are listed anyway
    # a row that did not run is said so, not judged; nor is anything when the plain row failed
    failed = dict(recs[1], status="error")
    assert "| forward with clamped entropy (topk=64) / plain forward | fused-topk64: error |" in gpucheck.summarize(
        [recs[0], failed])
    assert "| forward with clamped entropy (topk=64) / plain forward | not measured |" in gpucheck.summarize(recs[:1])
    assert "not judged: the plain fused row: error" in gpucheck.summarize([dict(recs[0], status="error")])
    # bounds are for H100/H200: another GPU is named
    assert "this run is on NVIDIA A100" in gpucheck.summarize([dict(kind="info", gpu="NVIDIA A100-SXM4-80GB")] + recs)


def test_summary_names_each_profiled_path():
    recs = [dict(kind="profile", shape=[8, 4, 16], label=label, kernels=[dict(kernel=k, calls=1, ms=1.5)])
            for label, k in (("log-prob + entropy", "linear_stats_kernel"),
                             ("log-prob + clamped entropy, topk=64", "logits_radix_kernel"))]
    text = gpucheck.summarize(recs)
    assert "## Fused forward+backward by kernel, (8, 4, 16), log-prob + entropy" in text
    assert "## Fused forward+backward by kernel, (8, 4, 16), log-prob + clamped entropy, topk=64" in text
    assert "| 1.50 | 1 | `logits_radix_kernel` |" in text
