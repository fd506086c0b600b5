"""Smoke tests of the ``fused-entropy`` command and its bench on a tiny case (timings are not tested)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest

from fused_entropy import cli
from fused_entropy.tools import bench, bench_worker
from fused_entropy.tools.bench_providers import PROVIDERS, Case, unavailable

TINY = ["--n", "64", "--h", "32", "--v", "512", "--seq-len", "16", "--rounds", "6", "--device", "cpu"]


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "demo" in out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--providers", "nope"], "unknown provider or family 'nope'"),
    (["--n", "-5"], "--n: must be a positive integer, got -5"),
    (["--v", "0"], "--v: must be a positive integer, got 0"),
    (["--h", "x"], "--h: expected a positive integer, got 'x'"),
    (["--rounds", "3"], "--rounds must be at least 6"),
    (["--timeout", "0"], "--timeout: must be positive"),
    (["--sweep-n", "1024"], "need --preset sweep"),
], ids=["provider", "n", "v", "h", "rounds", "timeout", "sweep-n"])
def test_bench_rejects_invalid_arguments(args, message, capsys):
    """Invalid arguments: exit status 2 and the offending value, before any row runs."""
    base = [a for a in TINY if a not in ("--n", "64")] if "--n" in args else TINY
    with pytest.raises(SystemExit) as e:
        bench.main([*base, *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_failed_row_exits_nonzero(monkeypatch, capsys):
    """A row whose worker fails makes the run exit 1, with the row named; the table still prints."""
    case = Case(n=64, h=32, v=512, seq_len=16)

    def fake_run_rows(names, cases, device, rounds, timeout, **kw):
        good = {"times_s": [1.0] * rounds, "gemms": 4, "working_bytes": 0}
        return [bench.Row("floor", case, result=dict(good, working_bytes=None)),
                bench.Row("fused", case, error="RuntimeError: boom")]

    monkeypatch.setattr(bench, "run_rows", fake_run_rows)
    assert bench.main([*TINY, "--providers", "floor,fused"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED: RuntimeError: boom" in out and "GEMM floor" in out
    assert "1 row(s) failed: fused (N=64, V=512): RuntimeError: boom" in err


def test_intervals_and_significance():
    """Medians with scipy's distribution-free interval; a ratio is ns exactly when intervals overlap."""
    med, lo, hi = bench.median_ci([1.0, 1.1, 0.9, 1.05, 0.95, 1.2])
    assert med == pytest.approx(1.025) and (lo, hi) == (0.9, 1.2)
    case = Case(n=64, h=32, v=512)
    row = lambda ts: bench.Row("fused", case, result={"times_s": ts})  # noqa: E731
    a, b, c = row([1.0, 1.1, 0.9, 1.05, 0.95, 1.2]), row([2.0, 2.1, 1.9, 2.05, 1.95, 2.2]), row([1.15, 1.3, 1.25] * 2)
    r = bench.ratio(a, b)
    assert r.significant and r.value == pytest.approx(1.025 / 2.025)
    assert r.low == pytest.approx(0.9 / 2.2) and r.high == pytest.approx(1.2 / 1.9)
    assert not bench.ratio(a, c).significant and str(bench.ratio(a, c)).endswith(" ns")


def test_bench_tiny_case_end_to_end(tmp_path, capsys):
    """Warm workers forked from the fork server, interleaved rounds: table, ratios, CSV, text and plot."""
    names = "floor,fused,reference,floor-grpo,fused-grpo"
    assert cli.main(["bench", *TINY, "--providers", names, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("GEMM floor: 4 GEMMs, best", "fused_entropy.linear_logprobs [torch]",
                  "reference (materialized, eager)", "LinearGRPOLoss, entropy_coef=0.01", "load average"):
        assert label in out, out
    assert "xfloor" in out and "xeager" in out and "95% CI" in out and "6 interleaved rounds" in out
    with open(tmp_path / "bench_quick_cpu.csv") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names.split(","))
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["status"])
        assert len(json.loads(r["times_s"])) == 6 and int(r["rounds"]) == 6
        assert float(r["time_ci_lo_s"]) <= float(r["time_s"]) <= float(r["time_ci_hi_s"])
        assert int(r["gemms"]) in (3, 4)
    # every non-floor row has a working-memory figure; the floor names the chunking it chose
    assert rows["floor"]["working_bytes"] == ""
    assert json.loads(rows["floor"]["info"])["chunk_rows"] in (32, 64)  # N = 64
    assert math.isfinite(float(rows["fused"]["working_frac_nv"]))
    ratio = float(rows["fused"]["time_s"]) / float(rows["reference"]["time_s"])
    assert float(rows["fused"]["x_baseline"]) == pytest.approx(ratio)
    assert float(rows["fused"]["x_baseline_lo"]) <= ratio <= float(rows["fused"]["x_baseline_hi"])
    assert (tmp_path / "bench_quick_cpu.png").stat().st_size > 1000
    assert "interleaved rounds" in (tmp_path / "bench_quick_cpu.txt").read_text()


def test_worker_failure_is_reported():
    """A provider that raises in its worker comes back as a failed row with the exception."""
    import torch

    bad = Case(n=64, h=32, v=512, dtype="no_such_dtype", seq_len=16)
    rows = bench.run_rows(["fused"], [bad], torch.device("cpu"), 6, 60)
    assert rows[0].error == "AttributeError: module 'torch' has no attribute 'no_such_dtype'"


def test_worker_measures_one_row_in_process(capsys):
    assert bench_worker.main(["--provider", "fused", "--n", "64", "--h", "32", "--v", "512", "--repeats", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["provider"] == "fused" and len(res["times_s"]) == 2
    assert res["grad_bytes"] == (64 + 512) * 32 * 4  # hidden and weight gradients, fp32
    assert res["peak_bytes"] >= res["baseline_bytes"] and isinstance(res["working_bytes"], int)


def test_floor_keeps_the_fastest_chunking():
    import torch

    from fused_entropy.tools.bench_providers import floor_plan

    cands, sel = floor_plan(Case(n=2048, h=512, v=32768), torch.device("cpu"))
    assert cands == [32, 128, 256, 512, 1024] and sel == 1024
    cands, _ = floor_plan(Case(n=16384, h=512, v=262144), torch.device("cpu"))
    assert max(cands) * 262144 * 4 <= 1 << 30  # no block over 1 GiB
    run = PROVIDERS["floor"].build(Case(n=100, h=16, v=64), torch.device("cpu"))
    per_row = run.info["candidates_s_per_row"]
    assert set(per_row) == {32, 100} and run.info["chunk_rows"] == min(per_row, key=per_row.get)


def test_missing_package_is_skipped_with_its_name():
    import torch

    p = dataclasses.replace(PROVIDERS["trl"], needs=("no_such_package_xyz",))
    assert "no_such_package_xyz" in unavailable(p, torch.device("cpu"))
    assert "CUDA only" in unavailable(PROVIDERS["trl-logits"], torch.device("cpu"))


def test_table_ratios_and_skip_lines():
    case = Case(n=64, h=32, v=512)
    res = lambda t, g: {"times_s": [t * f for f in (0.9, 1.0, 1.0, 1.0, 1.0, 1.1)], "gemms": g,  # noqa: E731
                        "working_bytes": case.nv_bytes // 20}
    rows = [
        bench.Row("floor", case, result=dict(res(0.5, 4), working_bytes=None, info={"chunk_rows": 32})),
        bench.Row("fused", case, result=res(1.0, 4)),
        bench.Row("reference", case, result=res(2.0, 3)),
        bench.Row("trl", case, result=res(1.05, 4)),
        bench.Row("liger-ce", case, skipped="package 'liger_kernel' is not installed"),
    ]
    lines = bench.family_table(rows, "linear_logprobs", case, "cpu")
    assert any("GEMM floor: 4 GEMMs, best chunking: 32 rows" in ln for ln in lines)
    fused = next(ln for ln in lines if "linear_logprobs [torch]" in ln)
    # xfloor, xeager (significant), xTRL (intervals overlap: ns), MiB, mem/[N,V]
    assert "2.00 [1.64-2.44]  0.50 [0.41-0.61]  0.95 [0.78-1.16] ns" in fused, fused
    assert fused.endswith(" 0.050")
    assert any("(CPU fallback)" in ln for ln in lines) and any("note: on CPU TRL runs its torch fallback" in ln for ln in lines)
    assert any("skipped: package 'liger_kernel' is not installed" in ln for ln in lines)


def test_cuda_table_prints_fraction_of_roofline_bound():
    """On CUDA each row of this package shows bound/time against tools.aot's roofline (on paper)."""
    from fused_entropy.tools import bench as B
    from fused_entropy.tools.aot import workload_bound
    from fused_entropy.tools.bench_providers import Case

    case = Case(n=8192, h=4096, v=131072, dtype="bfloat16", seq_len=1024)
    bound = workload_bound("linear", case.n, case.h, case.v, "bf16")[1]
    res = dict(times_s=[4 * bound] * 6, gemms=4, working_bytes=0)
    rows = [B.Row("fused", case, dict(res))]
    lines = B.family_table(rows, "linear_logprobs", case, "cuda")
    header = next(ln for ln in lines if "%bound" in ln)
    row = lines[lines.index(header) + 2]  # header, rule, first row
    end = header.index("%bound") + len("%bound")  # numeric columns are right-aligned
    assert row[:end].split()[-1] == "25.0", (header, row)
