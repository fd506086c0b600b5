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

TINY = ["--n", "64", "--h", "32", "--v", "512", "--seq-len", "16", "--repeats", "1", "--device", "cpu"]


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "bench" in out and "demo" in out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_bench_rejects_unknown_provider():
    with pytest.raises(SystemExit, match="unknown provider or family 'nope'"):
        cli.main(["bench", *TINY, "--providers", "nope"])


def test_bench_tiny_case_end_to_end(tmp_path, capsys):
    """Rows forked from the fork server: table, ratios, CSV and plot."""
    names = "floor,fused,reference,floor-grpo,fused-grpo"
    assert cli.main(["bench", *TINY, "--providers", names, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("GEMM floor: 4 GEMMs", "fused_entropy.linear_logprobs [torch]",
                  "reference (materialized, eager)", "LinearGRPOLoss, entropy_coef=0.01"):
        assert label in out, out
    assert "xfloor" in out and "xeager" in out and "mem/[N,V]" in out
    with open(tmp_path / "bench_quick_cpu.csv") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names.split(","))
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["status"])
        assert float(r["time_s"]) > 0 and int(r["gemms"]) in (3, 4)
    # every non-floor row has a working-memory figure; the fused row's ratio to the reference is consistent
    assert rows["floor"]["working_bytes"] == ""
    assert math.isfinite(float(rows["fused"]["working_frac_nv"]))
    ratio = float(rows["fused"]["time_s"]) / float(rows["reference"]["time_s"])
    assert float(rows["fused"]["x_baseline"]) == pytest.approx(ratio)
    assert (tmp_path / "bench_quick_cpu.png").stat().st_size > 1000


def test_worker_measures_one_row_in_process(capsys):
    assert bench_worker.main(["--provider", "fused", "--n", "64", "--h", "32", "--v", "512", "--repeats", "2"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["provider"] == "fused" and len(res["times_s"]) == 2
    assert res["time_lo_s"] <= res["time_s"] <= res["time_hi_s"]
    assert res["grad_bytes"] == (64 + 512) * 32 * 4  # hidden and weight gradients, fp32
    assert res["peak_bytes"] >= res["baseline_bytes"] and isinstance(res["working_bytes"], int)


def test_missing_package_is_skipped_with_its_name():
    import torch

    p = dataclasses.replace(PROVIDERS["trl"], needs=("no_such_package_xyz",))
    assert "no_such_package_xyz" in unavailable(p, torch.device("cpu"))
    assert "CUDA only" in unavailable(PROVIDERS["trl-logits"], torch.device("cpu"))


def test_table_ratios_and_skip_lines():
    case = Case(n=64, h=32, v=512)
    res = lambda t, g: {"time_s": t, "time_lo_s": t * 0.9, "time_hi_s": t * 1.1, "gemms": g,  # noqa: E731
                        "working_bytes": case.nv_bytes // 20}
    rows = [
        bench.Row("floor", case, result=dict(res(0.5, 4), working_bytes=None)),
        bench.Row("fused", case, result=res(1.0, 4)),
        bench.Row("reference", case, result=res(2.0, 3)),
        bench.Row("trl", case, result=res(4.0, 4)),
        bench.Row("liger-ce", case, skipped="package 'liger_kernel' is not installed"),
    ]
    lines = bench.family_table(rows, "linear_logprobs", case, "cpu")
    fused = next(ln for ln in lines if "linear_logprobs [torch]" in ln).split()
    # xfloor, xeager, xTRL, mem/[N,V] (then MiB)
    assert fused[-5:-1] == ["2.00", "0.50", "0.25", "0.050"]
    assert any("skipped: package 'liger_kernel' is not installed" in ln for ln in lines)


def test_cuda_table_prints_fraction_of_roofline_bound():
    """On CUDA each row of this package shows bound/time against tools.aot's roofline (on paper)."""
    from fused_entropy.tools import bench as B
    from fused_entropy.tools.aot import workload_bound
    from fused_entropy.tools.bench_providers import Case

    case = Case(n=8192, h=4096, v=131072, dtype="bfloat16", seq_len=1024)
    bound = workload_bound("linear", case.n, case.h, case.v, "bf16")[1]
    res = dict(time_s=4 * bound, time_lo_s=4 * bound, time_hi_s=4 * bound, gemms=4, working_bytes=0)
    rows = [B.Row("fused", case, dict(res))]
    lines = B.family_table(rows, "linear_logprobs", case, "cuda")
    header = next(ln for ln in lines if "%bound" in ln)
    row = lines[lines.index(header) + 2]  # header, rule, first row
    end = header.index("%bound") + len("%bound")  # numeric columns are right-aligned
    assert row[:end].split()[-1] == "25.0", (header, row)
