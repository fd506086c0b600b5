"""The ahead-of-time compile gate (fused_entropy.tools.aot): coverage of every kernel, its checks, a
small real compile for sm_80 and sm_90, and the roofline arithmetic.

The full gate (every shipped configuration) runs from .ci/run; here only its machinery is exercised.
Compiling needs Triton's JIT, not its interpreter, so those parts run in a subprocess without
TRITON_INTERPRET.
"""
import ast
import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from fused_entropy.kernels import configs
from fused_entropy.tools import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_python(code: str, *args, timeout=600):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         env=_compiler_env(), cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded():
    """What the gate sees: kernels, coverage errors, and per level the (kernel, configuration) pairs."""
    return _run_python("""
        import json
        from fused_entropy.tools import aot
        kernels = aot.discover_kernels()
        errors = []
        rec = aot.record_builds(errors)
        conf = lambda b: repr(aot._configuration(b))
        out = {
            "kernels": sorted(kernels),
            "errors": errors + aot.coverage_errors(kernels, rec),
            "recorded": sorted({(b.kernel, conf(b)) for b in rec}),
            "gate": sorted({(s.build.kernel, conf(s.build)) for s in aot.select_builds(rec, "gate")}),
            "quick": sorted(s.build.kernel for s in aot.select_builds(rec, "quick")),
            "flags_on": sorted({(b.kernel, k) for b in rec for k, v in b.flags.items() if v}),
            "gate_flags_on": sorted({(s.build.kernel, k) for s in aot.select_builds(rec, "gate")
                                     for k, v in s.build.flags.items() if v}),
            "upcast": sorted({repr(dict(b.constexprs).get("UPCAST")) for b in rec}),
        }
        print(json.dumps(out))
    """)


def _kernels_by_source():
    """Independent of the tool: every function in kernels/*.py decorated with triton.jit whose name
    ends in _kernel (the package's naming rule for entry points)."""
    names = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decos = [ast.unparse(d) for d in node.decorator_list]
                if any("triton.jit" in d for d in decos):
                    names.add(f"{path.stem}.{node.name}")
    return names


def test_every_kernel_in_kernels_has_aot_coverage(recorded):
    assert recorded["errors"] == []
    assert _kernels_by_source() <= set(recorded["kernels"])
    launched = {k for k, _ in recorded["recorded"]}
    assert set(recorded["kernels"]) <= launched
    assert sorted(recorded["quick"]) == sorted(recorded["kernels"])


def test_gate_compiles_every_configuration_and_flag(recorded):
    # every (kernel, dtype, blocks, warps, stages) the launchers use, and every flag switched on
    assert recorded["gate"] == recorded["recorded"]
    assert recorded["gate_flags_on"] == recorded["flags_on"]
    # compiled code never takes the interpreter's bf16 upcast
    assert recorded["upcast"] in (["False"], ["False", "None"], ["None"])


def test_a_kernel_without_coverage_is_reported(tmp_path):
    """A new kernel module with an entry point that no launcher launches fails the coverage check;
    helpers (called by a kernel, or returning a value) are not entry points."""
    pkg = tmp_path / "fake_kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "k.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def helper(x):
            return x + 1

        @triton.jit
        def store_helper(p, x):
            tl.store(p, x)

        @triton.jit
        def covered_kernel(p):
            store_helper(p, helper(tl.load(p)))

        @triton.heuristics({"FLAG": lambda a: True})
        @triton.jit
        def new_kernel(p, FLAG: tl.constexpr):
            tl.store(p, 1.0)
    """))
    found = _run_python("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from fused_entropy.tools import aot
        print(json.dumps(sorted(aot.discover_kernels("fake_kernels"))))
    """, str(tmp_path))
    assert found == ["k.covered_kernel", "k.new_kernel"]
    errors = aot.coverage_errors(found, [_fake_build("k.covered_kernel")])
    assert len(errors) == 1 and errors[0].startswith("k.new_kernel: no AOT coverage")


def _fake_build(kernel, flags=(), num_warps=8):
    return aot.Build(kernel=kernel, signature=(("x_ptr", "*bf16"),), constexprs=tuple((f, True) for f in flags),
                     attrs=(), options=(("num_warps", num_warps),), num_warps=num_warps, num_stages=3)


def _row(**kw):
    row = dict(regs=128, stack=0, static_smem=0, local=0, dyn_smem=65536, hgmma=4, hmma=0, dmma=0, spill_ops=0,
               dots=[("bf16", "bf16", "ieee")])
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "arch,row,expect",
    [
        (90, _row(), "ok"),
        (90, _row(stack=16, spill_ops=8), "spills"),
        (90, _row(local=64), "spills"),
        (90, _row(dyn_smem=227 * 1024 + 1), "shared memory"),
        (80, _row(dyn_smem=163 * 1024 + 1, hgmma=0, hmma=8), "shared memory"),
        (80, _row(dyn_smem=163 * 1024, hgmma=0, hmma=8), "ok"),
        (90, _row(regs=255, dyn_smem=0), "ok"),
        (90, _row(hgmma=0), "tensor-core"),
        (90, _row(hgmma=0, dots=[("f32", "f32", "ieee")]), "ok"),  # exact fp32 products: FMA by design
        (90, _row(hgmma=0, dots=[("f32", "f32", "tf32")]), "tensor-core"),
        (80, _row(hgmma=0, dmma=0, dots=[("f64", "f64", "ieee")]), "tensor-core"),
        (90, _row(hgmma=0, hmma=16), "warn"),
        (90, _row(hgmma=0, dots=[]), "ok"),  # no GEMM
        (90, {"error": "CompilationError: at 13:12"}, "does not compile"),
    ],
    ids=["clean", "stack-spill", "local", "smem-90", "smem-80", "smem-80-limit", "255-regs", "no-wgmma",
         "fp32-ieee", "tf32-no-tc", "fp64-no-dmma", "hmma-on-90", "no-dot", "compile-error"],
)
def test_check_rules(arch, row, expect):
    fails, warns = aot.check(row, _fake_build("m.k"), arch)
    if expect == "ok":
        assert fails == [] and warns == []
    elif expect == "warn":
        assert fails == [] and warns
    else:
        assert any(expect in f for f in fails), fails


def test_registers_times_threads_must_fit_the_register_file():
    fails, _ = aot.check(_row(regs=129, dyn_smem=0), _fake_build("m.k", num_warps=16), 90)
    assert any("registers" in f for f in fails)
    assert aot.check(_row(regs=128, dyn_smem=0), _fake_build("m.k", num_warps=16), 90) == ([], [])


def test_parsers():
    res = aot.parse_res_usage(" Function k:\n  REG:255 STACK:104 SHARED:1024 LOCAL:0 CONSTANT[0]:632 TEXTURE:0\n")
    assert res == {"regs": 255, "stack": 104, "static_smem": 1024, "local": 0}
    sass = ("        /*0a10*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;\n"
            "        /*0a20*/              @!P0 STL [R1+0x4], R3 ;\n"
            "        /*0a30*/                   LDL R3, [R1+0x4] ;\n")
    counts = aot.sass_counts(sass)
    assert counts["HGMMA"] == 1 and counts["STL"] == 1 and counts["LDL"] == 1
    ttir = ("%15 = tt.dot %13, %14, %arg20, inputPrecision = ieee : tensor<128x64xbf16> * tensor<64x64xbf16> "
            "-> tensor<128x64xf32> loc(#loc)\n"
            "%16 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x16xf32> * tensor<16x64xf32> "
            "-> tensor<64x64xf32>\n"
            "%dx = tt.dot %dz_op, %w_89, %cst_3 : tensor<128x64xbf16> * tensor<64x32xbf16> -> tensor<128x32xf32>\n")
    assert aot.dot_operands(ttir) == [("bf16", "bf16", "ieee"), ("f32", "f32", "tf32"), ("bf16", "bf16", "ieee")]


def test_compile_one_build_per_arch(tmp_path):
    """The machinery end to end: compile linear_stats (a bf16 GEMM) for sm_80 and sm_90, read the
    cubins, write the report; wgmma on sm_90, mma.sync on sm_80."""
    out = subprocess.run(
        [sys.executable, "-m", "fused_entropy.tools.aot", "--level", "quick", "--kernels", "linear_stats_kernel",
         "--arch", "80;90", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, env=_compiler_env(), cwd=ROOT, timeout=600,
    )
    rows = list(csv.DictReader(open(tmp_path / "aot_report.csv")))
    assert [r["arch"] for r in rows] == ["sm_80", "sm_90"], out.stdout[-2000:] + out.stderr[-2000:]
    assert all(r["kernel"] == "linear_stats_kernel" and r["config"].startswith("bf16 ") for r in rows)
    sm80, sm90 = rows
    for r in rows:
        assert 0 < int(r["regs"]) <= 255 and int(r["smem_bytes"]) > 0 and int(r["blocks_per_sm"]) >= 1
    assert (sm80["wgmma"], sm80["mma"]) == ("no", "HMMA")
    assert sm90["wgmma"] == "yes"
    assert out.returncode == (1 if any(r["status"] == "FAIL" for r in rows) else 0)
    assert "linear_stats_kernel" in (tmp_path / "aot_report.txt").read_text()


def test_roofline_counts_the_gemm_passes():
    n, h, v = 8192, 4096, 131072
    flops, seconds = aot.workload_bound("linear", n, h, v)
    assert flops == 8 * n * v * h  # forward + recompute + dX + dW
    assert seconds >= flops / 989e12
    flops_c, seconds_c = aot.workload_bound("linear+clamped", n, h, v)
    # clamped entropy: no GEMM recompute, the digits after the first are read from the logits buffer
    assert flops_c == flops
    assert seconds_c > seconds
    rows = {r["kernel"]: r for r in aot.roofline(n, h, v)}
    buffer_reads = len(configs.RADIX_DIGITS[32]) - 1
    assert rows["logits_radix_kernel (buffer)"]["launches"] == buffer_reads
    assert rows["linear_stats_kernel +TOPK"]["bytes"] >= n * v * 4  # every fp32 logit written once
    assert "linear_radix_kernel" not in aot.WORKLOADS["linear+clamped"][0]  # vocabulary parallel only
    # the single pass of LinearGRPOLoss: 3 GEMM passes
    flops_s, _ = aot.workload_bound("grpo-single", n, h, v)
    assert flops_s == 6 * n * v * h
    _, logits_s = aot.workload_bound("logits", n, h, v)
    assert logits_s == pytest.approx(3 * n * v * 2 / 3.35e12, rel=0.01)  # read, read again, write grad
    fwd = next(r for r in aot.roofline(n, h, v) if r["kernel"] == "linear_stats_kernel")
    c = configs.get("linear_stats", "bf16")
    assert fwd["tile_bytes"] == pytest.approx(2 * n * v * h * (c.block_n + c.block_v) * 2 / (2 * c.block_n * c.block_v))
    with pytest.raises(ValueError, match="workload"):
        aot.workload_bound("nope", n, h, v)
    assert "on paper, not measured" in aot.format_roofline(vocabs=(32768,))


def test_roofline_backward_has_no_atomics():
    """The backward (dz per chunk, then cuBLAS) adds nothing atomically and makes 3 GEMM passes."""
    n, h, v = 8192, 4096, 131072
    assert "linear_grad_kernel" not in aot.WORKLOADS["linear"][0] and "linear-atomic" not in aot.WORKLOADS
    rows = {r["kernel"]: r for r in aot.roofline(n, h, v)}
    assert rows["linear_dz_kernel"]["atomic_adds"] == 0 and rows["(cuBLAS) dW, dX"]["atomic_adds"] == 0
    assert rows["linear_dz_kernel"]["flops"] + rows["(cuBLAS) dW, dX"]["flops"] == 6 * n * v * h
