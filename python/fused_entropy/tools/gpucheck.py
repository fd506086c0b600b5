"""``fused-entropy gpucheck``: the one command to run when a GPU is lent for a few minutes.

It settles as much as possible in one call of at most ``--budget-s`` seconds (default 420, 7 min):

    env          GPU, SMs, clocks, driver, torch/triton, TF32 switches; two measured ceilings:
                 a large bf16 matmul (TFLOP/s) and a device-to-device copy (GB/s, read + write)
    correctness  the SHIPPED tile configurations (no overrides), bf16/fp16/fp32: log-prob, entropy,
                 clamped entropy (topk=64, clamp_p=0.3) and every gradient against an fp64 torch
                 reference on the same device, next to plain torch's own error at that precision;
                 exact ties at the top-k boundary; run-to-run determinism of forward and backward
                 (bitwise: no atomics); N*V > 2^31 through ``logprobs_from_logits``; fp32 ieee vs
                 tf32; the GRPO objective kernel against the torch path
    perf         bf16 (N, H, V) in (8192, 4096, 131072), (4096, 2048, 131072), (4096, 2048, 32768),
                 (8192, 4096, 151936): forward and forward+backward medians
                 (``triton.testing.do_bench``), peak memory, TFLOP/s and % of the measured matmul
                 ceiling, for the cuBLAS GEMM floor, native materialized torch, TRL, Liger, Cut
                 Cross-Entropy and this package; a kernel breakdown
                 (torch.profiler) of the fused path
    tests        the device-following test suite on CUDA (``FUSED_ENTROPY_TEST_DEVICE=cuda``),
                 split over parallel processes

Every step runs in a child process under its own time cap and appends JSON lines
(``{"section": ..., ...}``) to ``OUT/results.jsonl`` as it goes, so a step that crashes or is
killed loses only itself. The last lines printed are a Markdown summary, also written to
``OUT/summary.md``. ``--quick`` runs the same sections at tiny shapes (on CPU: the Triton kernels
under ``TRITON_INTERPRET=1`` with their shipped tiles, the perf rows on the torch backend), which
CI does on every commit so the kit cannot rot between GPU leases.

Exit status: 0 when every check that ran passed, 1 when a check failed or a step crashed or timed
out, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

# step -> (section, cap in seconds full, cap quick)
STEPS = {
    "env": ("env", 45, 30),
    "correctness": ("correctness", 130, 120),
    "perf": ("perf", 170, 60),
    "tiles": ("perf", 50, 60),
    "tests": ("tests", 120, 60),
}
SECTIONS = ("env", "correctness", "perf", "tests")
# section -> its steps, in the order they run
SECTION_STEPS = {"env": ("env",), "correctness": ("correctness",), "perf": ("perf", "tiles"), "tests": ("tests",)}
# forward tile candidates (BLOCK_N, BLOCK_V, BLOCK_H, warps, stages) timed against the shipped one on
# the first perf shape; the backward's dz kernel runs the same blocks with one stage less (128x128x64:
# the AOT gate's build, docs/PERFORMANCE.md "Tiles"). 64x128x32 with 4 warps (one warpgroup) is the
# shipped tile turned around: its plain forward fits 2 programs per SM with Triton 3.6 as with 3.9,
# where the shipped one fits 1 with 3.6 (bench/results/aot/2026-11-30-triton-releases.md)
TILE_CANDIDATES = ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 32, 4, 4), (128, 128, 32, 4, 4))
FULL_SHAPES = ((8192, 4096, 131072), (4096, 2048, 131072), (4096, 2048, 32768), (8192, 4096, 151936))
QUICK_SHAPES = ((256, 64, 1000),)
# test files whose tests follow FUSED_ENTROPY_TEST_DEVICE (tests/conftest.py)
DEVICE_TESTS = ("tests/test_linear_logprobs.py", "tests/test_logprobs_from_logits.py", "tests/test_clamped_entropy.py",
                "tests/test_triton_backward.py", "tests/test_triton_logits_buffer.py", "tests/test_grpo_loss.py",
                "tests/test_shipped_configs.py", "tests/test_numerics.py", "tests/test_sampling.py",
                "tests/test_launch_order.py", "tests/test_nonfinite.py")
QUICK_TESTS = ("tests/test_validation.py",)
MIN_BUDGET_S = 10
# The performance targets of docs/PERFORMANCE.md ("Targets"), judged in the summary from the perf rows at
# this shape in bf16 on a GPU: (what, row, measure, bound). For the plain fused row ("fused") the measure
# itself ("fwd"/"fwdbwd" ms, "mem_per_nv": peak working memory over one [N, V] bf16 buffer); for any
# other row its "fwd"/"fwdbwd" time over the plain fused row's, per token each row computes (the GRPO
# rows skip padding). The bounds are for one H100/H200.
TARGET_SHAPE = (8192, 4096, 131072)
TARGETS = (
    ("forward+backward, log-prob + entropy (ms)", "fused", "fwdbwd", 42.0),
    ("forward, log-prob + entropy (ms)", "fused", "fwd", 12.0),
    ("forward with clamped entropy (topk=64) / plain forward", "fused-topk64", "fwd", 1.6),
    ("LinearGRPOLoss with the entropy bonus / linear_logprobs, forward+backward", "fused-grpo", "fwdbwd", 1.05),
    ("working memory / one [N, V] bf16 buffer, forward+backward", "fused", "mem_per_nv", 0.5),
)
MAX_SHAPE_ELEMENTS = 2 ** 36  # 128 GiB of bf16: more than an H200 holds


# ---------------------------------------------------------------------------------------------
# results file
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON object per line to ``results.jsonl``; flushed at once (a kill loses nothing)."""

    def __init__(self, out: str, section: str):
        self.path = os.path.join(out, "results.jsonl")
        self.section = section

    def __call__(self, kind: str, **fields) -> dict:
        rec = {"section": self.section, "kind": kind, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")
        return rec


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def read_results(out: str) -> List[dict]:
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    recs.append({"section": "?", "kind": "garbled", "text": line[:200]})
    return recs


# ---------------------------------------------------------------------------------------------
# shared helpers for the steps (run inside the child process)
# ---------------------------------------------------------------------------------------------


def _device(args):
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in fp64 (inf when a has a non-finite entry)."""
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def _time_fn(fn, device, grad_to_none=None, min_reps: int = 5, target_s: float = 0.25) -> float:
    """Median seconds of ``fn``: ``triton.testing.do_bench`` on CUDA, wall clock on CPU."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-5)
        rep_ms = max(target_s, min_reps * est) * 1e3
        return do_bench(fn, warmup=max(2 * est * 1e3, 5.0), rep=rep_ms, grad_to_none=grad_to_none,
                        return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(max(3, min_reps // 2)):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# ---------------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------------


def step_env(args, rec: Recorder) -> bool:
    import torch
    import triton

    device = _device(args)
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(device), "interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import fused_entropy

        info["fused_entropy"] = fused_entropy.__version__
        info["commit"] = _git_commit()
    except Exception as e:  # pragma: no cover - reported, not fatal
        info["fused_entropy"] = f"import failed: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", l2_mib=round(getattr(p, "L2_cache_size", 0) / 2 ** 20, 1),
                    cuda=torch.version.cuda, allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    allow_tf32_cudnn=torch.backends.cudnn.allow_tf32,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
        info.update(_nvidia_smi())
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    rec("info", **info)
    print(json.dumps(info))

    # ceilings: a large matmul and a large copy, on random data (zeros run faster)
    if device.type == "cuda":
        n, dt = (8192, torch.bfloat16)
        copy_elems = 2 ** 30  # 2 GiB of bf16... read 2 GiB + write 2 GiB
    else:
        n, dt = (512, torch.float32)
        copy_elems = 2 ** 24
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = _time_fn(lambda: torch.mm(a, b), device, min_reps=10)
    tflops = 2 * n ** 3 / t / 1e12
    rec("ceiling", name="matmul", dtype=str(dt).replace("torch.", ""), shape=[n, n, n], seconds=t, tflops=tflops)
    del a, b
    src = torch.randn(copy_elems, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    dst = torch.empty_like(src)
    t = _time_fn(lambda: dst.copy_(src), device, min_reps=10)
    gbs = 2 * src.numel() * src.element_size() / t / 1e9
    rec("ceiling", name="copy", bytes=2 * src.numel() * src.element_size(), seconds=t, gbs=gbs)
    print(f"ceilings: matmul {tflops:.1f} TFLOP/s, copy {gbs:.0f} GB/s")
    return True


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _nvidia_smi() -> dict:
    q = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        vals = [v.strip() for v in r.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(["driver", "clock_sm", "clock_sm_max", "clock_mem", "power_limit", "temperature"], vals))
    except Exception as e:
        return {"nvidia_smi": f"unavailable: {e}"}


# ---------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------

# a kernel's error against fp64 may exceed plain torch's at the same precision by this factor plus a
# floor (the floors are well under the precision's own rounding: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32)
ERR_FACTOR = 2.0
ERR_FLOOR = {"bfloat16": 2e-3, "float16": 3e-4, "float32": 2e-6}


def _linear_case(n, h, v, dtype, device, seed=0, ignored=0.05):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=torch.float64) * 1.5
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignored] = -100
    up = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3)]
    cast = lambda t: t.to(dtype).to(device)
    return cast(x), cast(w), cast(b), y.to(device), [u.to(device) for u in up]


def _grads(fn, x, w, b, y, up, dtype, **kw):
    """Outputs and (dx, dw, db) of sum(up0*logp + up1*H + up2*H_clamped) through ``fn`` at ``dtype``."""
    import torch

    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    outs = [out.logprobs, out.entropy, out.clamped_entropy]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, up) if o is not None)
    grads = torch.autograd.grad(loss, leaves)
    return [None if o is None else o.detach() for o in outs], [g.detach() for g in grads]


def _compare(rec, label, dtype_name, got, gold, base, valid) -> bool:
    """Record the kernel's and plain torch's relative errors against fp64 for each output/gradient."""
    names = ("logprobs", "entropy", "clamped_entropy", "grad_hidden", "grad_weight", "grad_bias")
    ok_all = True
    for name, a, e, t in zip(names, got, gold, base):
        if a is None or e is None:
            continue
        if name in ("logprobs", "entropy", "clamped_entropy"):
            a, e, t = a[valid], e[valid], t[valid]
        err = _rel(a, e)
        torch_err = _rel(t, e) if t is not None else float("nan")
        bound = ERR_FACTOR * (torch_err if math.isfinite(torch_err) else 0.0) + ERR_FLOOR[dtype_name]
        ok = err <= bound
        ok_all &= ok
        rec("check", name=f"{label} {name}", dtype=dtype_name, err=err, torch_err=torch_err, bound=bound, ok=ok)
        print(f"  {'ok ' if ok else 'BAD'} {label} {name}: rel err {err:.2e} (torch {torch_err:.2e}, bound {bound:.2e})")
    return ok_all


def _check_linear(rec, device, dtype, n, h, v, **kw) -> bool:
    import torch

    import fused_entropy as fe
    from fused_entropy import reference as R

    name = str(dtype).replace("torch.", "")
    x, w, b, y, up = _linear_case(n, h, v, dtype, device)
    valid = y != -100
    ok = True
    for extra, label in ((dict(entropy=True), "plain"), (dict(entropy=True, topk=64), "topk=64"),
                         (dict(entropy=False, clamp_p=0.3), "clamp_p=0.3")):
        args = dict(kw, **extra)
        u = list(up) if "topk" in extra or "clamp_p" in extra else [up[0], up[1], None]
        if not extra["entropy"]:
            u[1] = None
        got = _grads(fe.linear_logprobs, x, w, b, y, u, dtype, backend="auto", **args)
        gold = _grads(R.linear_logprobs, x, w, b, y, u, torch.float64, **args)
        base = _grads(R.linear_logprobs, x, w, b, y, u, dtype, **args)
        ok &= _compare(rec, f"linear {n}x{h}x{v} {label}", name, got[0] + got[1], gold[0] + gold[1],
                       base[0] + base[1], valid)
    return ok


def _check_ties(rec, device, dtype) -> bool:
    """Ten identical W rows that hold every row's largest logit; topk=5 puts the boundary inside
    the tie group, where each tied logit carries weight (k - #above) / #tied."""
    import torch

    import fused_entropy as fe
    from fused_entropy import reference as R

    n, h, v = 70, 64, 300
    g = torch.Generator().manual_seed(3)
    w = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.05
    u = torch.randn(h, generator=g, dtype=torch.float64)
    w[:10] = u / u.norm()
    x = u / u.norm() * 4 + torch.randn(n, h, generator=g, dtype=torch.float64) * 0.02
    y = torch.randint(0, v, (n,), generator=g)
    up = [torch.randn(n, generator=g, dtype=torch.float64).to(device) for _ in range(3)]
    x, w, y = x.to(dtype).to(device), w.to(dtype).to(device), y.to(device)
    b = torch.zeros(v, dtype=dtype, device=device)
    got = _grads(fe.linear_logprobs, x, w, b, y, up, dtype, topk=5)
    gold = _grads(R.linear_logprobs, x, w, b, y, up, torch.float64, topk=5)
    base = _grads(R.linear_logprobs, x, w, b, y, up, dtype, topk=5)
    name = str(dtype).replace("torch.", "")
    return _compare(rec, "ties topk=5 inside a group of 10", name, got[0] + got[1], gold[0] + gold[1],
                    base[0] + base[1], torch.ones(n, dtype=torch.bool, device=device))


def _check_determinism(rec, device, n, h, v) -> bool:
    import torch

    import fused_entropy as fe

    x, w, b, y, up = _linear_case(n, h, v, torch.bfloat16 if device.type == "cuda" else torch.float32, device, seed=5)
    runs = []
    for _ in range(3):
        out, grads = _grads(fe.linear_logprobs, x, w, b, y, [up[0], up[1], None], x.dtype, entropy=True)
        runs.append([o for o in out if o is not None] + list(grads))
    diffs = [max((r[i].double() - runs[0][i].double()).abs().max().item() for r in runs[1:])
             for i in range(len(runs[0]))]
    fwd, bwd = max(diffs[:2]), max(diffs[2:])
    # no atomics anywhere: forward and backward bitwise equal run to run
    ok = fwd == 0 and bwd == 0
    rec("check", name="determinism 3 runs", fwd_max_abs=fwd, bwd_max_abs=bwd, ok=ok, shape=[n, h, v],
        dtype=str(x.dtype).replace("torch.", ""))
    print(f"  {'ok ' if ok else 'BAD'} determinism: fwd {fwd:.3g}, bwd {bwd:.3g}")
    return ok


def _check_large_index(rec, device) -> bool:
    """logprobs_from_logits over N*V > 2^31 elements; rows on both sides of the 2^31 boundary
    against fp64."""
    import torch

    import fused_entropy as fe
    from fused_entropy import reference as R

    v = 131072
    n = (2 ** 31) // v + 16  # 16400 rows: 2.15e9 elements, 4.3 GB of bf16
    g = torch.Generator(device=device).manual_seed(7)
    z = (torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=g) * 2).requires_grad_(True)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    out = fe.logprobs_from_logits(z, y, entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    rows = torch.cat([torch.arange(0, 8), torch.arange(2 ** 31 // v - 4, 2 ** 31 // v + 4), torch.arange(n - 8, n)]).to(device)
    zr = z.detach()[rows].double().requires_grad_(True)
    gold = R.logprobs_from_logits(zr, y[rows], entropy=True)
    (gold.logprobs.sum() + gold.entropy.sum()).backward()
    errs = {"logprobs": _rel(out.logprobs[rows], gold.logprobs), "entropy": _rel(out.entropy[rows], gold.entropy),
            "grad_logits": _rel(z.grad[rows], zr.grad)}
    ok = all(e < 1e-2 for e in errs.values())  # bf16 gradient storage: 2^-8 relative rounding
    rec("check", name=f"N*V > 2^31 (N={n}, V={v}) logprobs_from_logits", ok=ok, **{f"err_{k}": e for k, e in errs.items()})
    print(f"  {'ok ' if ok else 'BAD'} large index: {errs}")
    return ok


def _check_tf32(rec, device) -> bool:
    """fp32 inputs: exact ('ieee') products by default, TF32 when torch's allow_tf32 is on."""
    import torch

    import fused_entropy as fe
    from fused_entropy import reference as R

    x, w, b, y, up = _linear_case(512, 1024, 8003, torch.float32, device, seed=9)
    gold = _grads(R.linear_logprobs, x, w, b, y, up[:2] + [None], torch.float64)
    res = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for mode, flag in (("ieee", False), ("tf32", True)):
            torch.backends.cuda.matmul.allow_tf32 = flag
            got = _grads(fe.linear_logprobs, x, w, b, y, up[:2] + [None], torch.float32)
            valid = y != -100
            res[mode] = {"logprobs": _rel(got[0][0][valid], gold[0][0][valid]),
                         "entropy": _rel(got[0][1][valid], gold[0][1][valid]),
                         "grad_hidden": _rel(got[1][0], gold[1][0]), "grad_weight": _rel(got[1][1], gold[1][1])}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    ok = max(res["ieee"].values()) < 1e-5 and max(res["tf32"].values()) < 5e-3
    rec("check", name="fp32 ieee vs tf32 (512x1024x8003)", ok=ok, ieee=res["ieee"], tf32=res["tf32"])
    print(f"  {'ok ' if ok else 'BAD'} fp32 ieee {res['ieee']} tf32 {res['tf32']}")
    return ok


def _check_grpo(rec, device) -> bool:
    import torch

    from fused_entropy import grpo_loss

    g = torch.Generator().manual_seed(11)
    bsz, t = 6, 37
    lp = -torch.rand(bsz, t, generator=g) * 3
    old = lp + 0.3 * torch.randn(bsz, t, generator=g)
    ent = torch.rand(bsz, t, generator=g) * 3
    adv = torch.randn(bsz, generator=g)
    mask = torch.rand(bsz, t, generator=g) > 0.2
    lp, old, ent, adv, mask = (q.to(device) for q in (lp, old, ent, adv, mask))
    ok = True
    worst = 0.0
    for lt in ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"):
        res = {}
        for be in ("torch", "triton"):
            a = lp.clone().requires_grad_(True)
            e = ent.clone().requires_grad_(True)
            loss, _ = grpo_loss(a, adv, mask, old_logprobs=old, entropy=e, loss_type=lt, entropy_coef=0.01,
                                epsilon_high=0.28, max_completion_length=t, backend=be)
            ga, ge = torch.autograd.grad(loss, (a, e))
            res[be] = (loss.detach(), ga, ge)
        d = max((x - y).abs().max().item() for x, y in zip(res["torch"], res["triton"]))
        worst = max(worst, d)
        ok &= d < 1e-5
    rec("check", name="GRPO objective kernel vs torch path (6 loss types)", max_abs=worst, ok=ok)
    print(f"  {'ok ' if ok else 'BAD'} grpo objective triton vs torch: max abs {worst:.2e}")
    return ok


def step_correctness(args, rec: Recorder) -> bool:
    import torch

    device = _device(args)
    if device.type != "cuda":
        from fused_entropy.backends import interpreting

        if not interpreting():
            rec("skip", name="correctness", why="no GPU and TRITON_INTERPRET unset: the Triton kernels cannot run")
            return True
    if args.quick:
        # just over one shipped tile (bf16/fp16 128x64x32, fp32 64x32x16): ragged N, H and V
        shapes = {torch.bfloat16: (130, 40, 131), torch.float16: (130, 40, 131), torch.float32: (67, 20, 131)}
    else:
        shapes = {d: (1000, 4096, 32003) for d in (torch.bfloat16, torch.float16, torch.float32)}
    kw = dict(softcap=30.0, temperature=0.7)
    checks: List[Callable[[], bool]] = []
    for dt, (n, h, v) in shapes.items():
        checks.append(lambda dt=dt, n=n, h=h, v=v: _check_linear(rec, device, dt, n, h, v, **kw))
    checks.append(lambda: _check_ties(rec, device, torch.bfloat16 if device.type == "cuda" else torch.float32))
    checks.append(lambda: _check_determinism(rec, device, *((1000, 4096, 32003) if not args.quick else (130, 40, 131))))
    if device.type == "cuda" and not args.quick:
        checks.append(lambda: _check_large_index(rec, device))
        checks.append(lambda: _check_tf32(rec, device))
    else:
        rec("skip", name="N*V > 2^31 and fp32 tf32", why="needs a GPU (4.3 GB of logits; TF32 units)")
    checks.append(lambda: _check_grpo(rec, device))
    ok = True
    for check in checks:
        try:
            ok &= bool(check())
        except Exception as e:
            ok = False
            rec("error", name=getattr(check, "__name__", "check"), error=f"{type(e).__name__}: {e}",
                trace=traceback.format_exc()[-2000:])
            print(traceback.format_exc())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


# ---------------------------------------------------------------------------------------------
# perf
# ---------------------------------------------------------------------------------------------


def _perf_rows(case, device) -> List[tuple]:
    """(name, label, gemms_fwd, gemms_fwdbwd, build) rows; ``build()`` returns (fwd, fwdbwd, leaves)
    or raises ImportError/RuntimeError with the reason the row cannot run."""
    import torch

    from .bench import providers as P

    rows = []

    def fused(entropy=True, topk=None, clamp_p=None, backend="auto"):
        def build():
            from fused_entropy import linear_logprobs

            x, w, y = P.linear_inputs(case, device)

            def fwd():
                return linear_logprobs(x, w, y, entropy=entropy, topk=topk, clamp_p=clamp_p, backend=backend)

            def fwdbwd():
                out = fwd()
                loss = out.logprobs.sum()
                for o in (out.entropy, out.clamped_entropy):
                    if o is not None:
                        loss = loss + o.sum()
                loss.backward()

            return fwd, fwdbwd, [x, w]

        return build

    def floor():
        x, w, _ = P.linear_inputs(case, device, grad=False)
        z = torch.empty(case.n, case.v, device=device, dtype=x.dtype)
        gx, gw = torch.empty_like(x), torch.empty_like(w)

        def fwd():
            torch.mm(x, w.T, out=z)

        def fwdbwd():
            torch.mm(x, w.T, out=z)
            torch.mm(x, w.T, out=z)
            torch.mm(z, w, out=gx)
            torch.mm(z.T, x, out=gw)

        return fwd, fwdbwd, []

    def native():
        x, w, y = P.linear_inputs(case, device)

        def fwd():
            logits = (x @ w.T).float()
            logp_all = torch.log_softmax(logits, dim=-1)
            logp = logp_all.gather(1, y[:, None])[:, 0]
            ent = -(logp_all.exp() * logp_all).sum(-1)
            return logp, ent

        def fwdbwd():
            logp, ent = fwd()
            (logp.sum() + ent.sum()).backward()

        return fwd, fwdbwd, [x, w]

    def trl():
        from trl.kernels import ChunkedLogProbFunction

        x, w, y = P.linear_inputs(case, device)

        def fwd():
            return ChunkedLogProbFunction.apply(x, w, None, y, 1.0, P.TRL_CHUNK_SIZE, None, 1.0, ("entropy",))[:2]

        def fwdbwd():
            logp, ent = fwd()
            (logp.sum() + ent.sum()).backward()

        return fwd, fwdbwd, [x, w]

    def liger_ce():
        x, w, y = P.linear_inputs(case, device)
        apply, note = P.liger_ce_apply(device)

        def fwd():
            return apply(x, w, y)

        def fwdbwd():
            nll, ent = fwd()
            (ent.sum() - nll.sum()).backward()

        return fwd, fwdbwd, [x, w], note

    def cce():
        from cut_cross_entropy import linear_cross_entropy

        x, w, y = P.linear_inputs(case, device)

        def fwd():
            return linear_cross_entropy(x, w, y, reduction="sum")

        def fwdbwd():
            fwd().backward()

        return fwd, fwdbwd, [x, w]

    def grpo(entropy_coef):
        def build():
            from fused_entropy import LinearGRPOLoss

            loss_fn = LinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", entropy_coef=entropy_coef)
            x, w, ids, mask, adv = P.grpo_inputs(case, device)

            def fwd():
                with torch.no_grad():
                    return loss_fn(x, w, ids, mask, adv)

            def fwdbwd():
                loss_fn(x, w, ids, mask, adv)[0].backward()

            return fwd, fwdbwd, [x, w]

        return build

    def liger_grpo():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # compiled=False: the compiled part is only Liger's per-token loss math, and compiling it
        # would spend the lease's minutes in the compiler
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=False)
        x, w, ids, mask, adv = P.grpo_inputs(case, device)

        def fwd():
            with torch.no_grad():
                return loss_fn(x, w, ids, mask, adv)

        def fwdbwd():
            loss_fn(x, w, ids, mask, adv)[0].backward()

        return fwd, fwdbwd, [x, w]

    rows.append(("floor", "cuBLAS GEMM floor (1 fwd / 4 fwd+bwd)", 1, 4, floor))
    rows.append(("fused", "fused linear_logprobs logp+H", 1, 4, fused()))
    if device.type == "cuda":
        rows.append(("fused-torch", "fused linear_logprobs [torch backend]", 1, 4, fused(backend="torch")))
    rows.append(("native", "native torch (materialized logits, log_softmax)", 1, 3, native))
    rows.append(("liger-ce", "Liger FusedLinearScaledCE(return_entropy)", 1, 4, liger_ce))
    rows.append(("trl", "TRL ChunkedLogProbFunction (+entropy)", 1, 4, trl))
    k = min(64, case.v)  # a vocabulary smaller than 64 (--shapes) gets k = V
    rows.append((f"fused-topk{k}", f"fused logp + clamped H, topk={k}", None, None, fused(entropy=False, topk=k)))
    rows.append(("fused-clamp0.3", "fused logp + clamped H, clamp_p=0.3", None, None, fused(entropy=False, clamp_p=0.3)))
    rows.append(("fused-grpo", "LinearGRPOLoss dapo, entropy_coef=0.01", 1, 3, grpo(0.01)))
    rows.append(("liger-grpo", "Liger LigerFusedLinearGRPOLoss dapo (no entropy)", 1, 4, liger_grpo))
    rows.append(("cce", "Cut Cross-Entropy linear_cross_entropy (loss only, no entropy)", 1, 3, cce))
    return rows


def _perf_case(args, rec: Recorder, device, shape, ceiling: Optional[float], profile: bool) -> bool:
    import torch

    from .bench import providers as P

    n, h, v = shape
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    seq = 1024 if n >= 2048 else max(1, n // 4)
    case = P.Case(n=n, h=h, v=v, dtype=dtype, seq_len=seq)
    nv_bytes = n * v * (2 if dtype == "bfloat16" else 4)
    ok = True
    for name, label, g_fwd, g_all, build in _perf_rows(case, device):
        base = dict(shape=[n, h, v], dtype=dtype, row=name, label=label)
        try:
            built = build()
            fwd, fwdbwd, leaves = built[:3]
            if len(built) > 3:  # a note on what actually ran (e.g. a peer's fallback path)
                label = base["label"] = label + built[3]
        except (ImportError, ModuleNotFoundError) as e:
            rec("perf", status="unavailable", why=f"{type(e).__name__}: {e}", **base)
            print(f"  - {label}: unavailable ({e})")
            continue
        except Exception as e:
            ok = False
            rec("perf", status="error", why=f"{type(e).__name__}: {e}", **base)
            print(f"  - {label}: build failed ({e})")
            continue
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t_fwd = _time_fn(fwd, device, grad_to_none=leaves or None)
            t_all = _time_fn(fwdbwd, device, grad_to_none=leaves or None)
            peak = None
            if device.type == "cuda":
                for t in leaves:
                    t.grad = None
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fwdbwd()
                torch.cuda.synchronize()
                grads = sum(t.numel() * t.element_size() for t in leaves)
                peak = torch.cuda.max_memory_allocated() - before - grads
            if g_fwd is None:  # clamped rows: the GEMM passes the design makes
                g_fwd, g_all = _clamped_passes(case.torch_dtype, device)
            flop = lambda g: 2 * n * h * v * g
            # tokens the row computes: the GRPO rows skip their padded positions (grpo_inputs)
            tokens = sum(P.grpo_lengths(case)) if "grpo" in name else n
            r = dict(status="ok", fwd_ms=t_fwd * 1e3, fwdbwd_ms=t_all * 1e3, gemms_fwd=g_fwd, gemms_fwdbwd=g_all,
                     tokens=tokens,
                     tflops_fwd=flop(g_fwd) / t_fwd / 1e12, tflops_fwdbwd=flop(g_all) / t_all / 1e12,
                     peak_mib=None if peak is None else peak / 2 ** 20,
                     mem_per_nv=None if peak is None else peak / nv_bytes)
            if ceiling:
                r["pct_ceiling_fwdbwd"] = 100 * r["tflops_fwdbwd"] / ceiling
                r["pct_ceiling_fwd"] = 100 * r["tflops_fwd"] / ceiling
            rec("perf", **base, **r)
            print(f"  {label}: fwd {t_fwd * 1e3:.2f} ms, fwd+bwd {t_all * 1e3:.2f} ms"
                  + ("" if peak is None else f", peak {peak / 2 ** 20:.0f} MiB"))
        except Exception as e:
            ok = False
            rec("perf", status="error", why=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:], **base)
            print(f"  - {label}: FAILED {type(e).__name__}: {e}")
        finally:
            del fwd, fwdbwd, leaves
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # per-kernel times of the plain path and of the clamped one (where its forward's time goes: the
        # GEMM with the first radix digit's histogram atomics, or the passes over the logits buffer)
        if profile and device.type == "cuda" and (name == "fused" or name.startswith("fused-topk")):
            _profile(rec, case, device, topk=int(name[len("fused-topk"):]) if name != "fused" else None)
    return ok


def _clamped_passes(dtype, device):
    try:
        from fused_entropy import _launch

        fwd = int(_launch.radix_gemm_passes(dtype)) if device.type == "cuda" else 1
    except (ImportError, AttributeError):
        fwd = 1
    return fwd, fwd + 3


def _profile(rec, case, device, topk: Optional[int] = None) -> None:
    """Per-kernel CUDA time of one fused forward+backward (torch.profiler): log-prob + entropy, or with
    ``topk`` log-prob + clamped entropy."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fused_entropy import linear_logprobs

    from .bench import providers as P

    label = "log-prob + entropy" if topk is None else f"log-prob + clamped entropy, topk={topk}"

    def run(x, w, y):
        out = linear_logprobs(x, w, y, entropy=topk is None, topk=topk)
        (out.logprobs.sum() + (out.entropy if topk is None else out.clamped_entropy).sum()).backward()

    try:
        x, w, y = P.linear_inputs(case, device)
        run(x, w, y)
        torch.cuda.synchronize()
        x.grad = w.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(x, w, y)
            torch.cuda.synchronize()
        kernels = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None)
            if t is None:
                t = getattr(evt, "cuda_time_total", 0)
            if t and t > 0:
                kernels.append((evt.key, evt.count, t / 1e3))
        kernels.sort(key=lambda k: -k[2])
        top = [{"kernel": k[:90], "calls": c, "ms": round(ms, 3)} for k, c, ms in kernels[:10]]
        rec("profile", shape=[case.n, case.h, case.v], label=label, kernels=top)
        for k in top:
            print(f"    {k['ms']:8.2f} ms  x{k['calls']:<4} {k['kernel']}")
    except Exception as e:
        rec("profile", label=label, status="error", why=f"{type(e).__name__}: {e}")


def step_perf(args, rec: Recorder) -> bool:
    device = _device(args)
    ceiling = None
    for r in read_results(args.out):
        if r.get("kind") == "ceiling" and r.get("name") == "matmul":
            ceiling = r.get("tflops")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(s) for s in spec.split(",")) for spec in args.shapes]
    ok = True
    for i, shape in enumerate(shapes):
        print(f"perf {shape}")
        ok &= _perf_case(args, rec, device, shape, ceiling, profile=(i == 0))
    return ok


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def step_tests(args, rec: Recorder) -> bool:
    import re

    import torch

    device = _device(args)
    root = _repo_root()
    if root is None:
        rec("skip", name="tests", why="the tests/ folder is not next to this installation (installed from a wheel)")
        return True
    files = QUICK_TESTS if args.quick else DEVICE_TESTS
    files = [f for f in files if os.path.exists(os.path.join(root, f))]
    env = dict(os.environ)
    env["FUSED_ENTROPY_TEST_DEVICE"] = device.type
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rf", "-p", "no:cacheprovider", *files]
    workers = 0
    if device.type == "cuda" and _has("xdist"):
        workers = min(8, os.cpu_count() or 1)
        cmd[4:4] = ["-n", str(workers)]
    if _has("pytest_timeout"):
        cmd[4:4] = ["--timeout", "300"]
    cap = max(10.0, args.step_cap - 10)
    log = os.path.join(args.out, "tests.log")
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=cap), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, timed_out = None, True
    with open(log) as f:
        text = f.read()
    # count from the per-test lines (-v), so a run stopped at its cap still says how far it got
    counts = {}
    for word in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL", "XPASS"):
        k = len(re.findall(rf"(?:^|\] | ){word}(?: |$)", text, flags=re.M))
        if k:
            counts[word.lower()] = k
    failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:10]
    if not failures:
        failures = [ln.strip() for ln in text.splitlines() if " FAILED " in ln or ln.rstrip().endswith(" FAILED")][:10]
    ok = (rc == 0) and not timed_out
    rec("tests", files=list(files), device=device.type, workers=workers, rc=rc, timed_out=timed_out,
        seconds=round(time.time() - t0, 1), counts=counts, failures=failures, tail=text[-3000:], ok=ok)
    print(text[-3000:])
    del torch
    return ok


def _repo_root() -> Optional[str]:
    """The checkout holding tests/: ``FUSED_ENTROPY_REPO``, else three levels above this file
    (an editable install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.environ.get("FUSED_ENTROPY_REPO") or os.path.abspath(os.path.join(here, "..", "..", ".."))
    return root if os.path.isdir(os.path.join(root, "tests")) else None


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def step_tiles(args, rec: Recorder) -> bool:
    """Forward and forward+backward of ``linear_logprobs`` (chunked backward) at the first perf shape
    with each candidate tile next to the shipped one: the data for choosing Hopper tiles."""
    from dataclasses import replace

    import torch

    from fused_entropy import linear_logprobs
    from fused_entropy.kernels import configs as C

    from .bench import providers as P

    device = _device(args)
    if device.type != "cuda":
        from fused_entropy.backends import interpreting

        if not interpreting():
            rec("skip", name="tiles", why="no GPU and TRITON_INTERPRET unset")
            return True
    n, h, v = (QUICK_SHAPES if args.quick else FULL_SHAPES)[0]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    case = P.Case(n=n, h=h, v=v, dtype=dtype)
    key = "bf16" if dtype == "bfloat16" else "fp32"
    shipped = C.get("linear_stats", key)
    tiles = [C.Config(bn, bv, bh, num_warps=w, num_stages=st) for bn, bv, bh, w, st in TILE_CANDIDATES]
    runs = [("tile0", _tile_label(shipped) + " (shipped)", {})]
    # the launch plan before grouped order and whole waves: every row block at once, SPLIT for 2 programs/SM
    n_blocks = -(-n // shipped.block_n)
    n_vtiles = -(-v // shipped.block_v)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    old_split = 1 if n_blocks >= 2 * sms else max(1, min(n_vtiles, -(-2 * sms // n_blocks)))
    runs.append(("order_plain", _tile_label(shipped) + f" plain order, split {old_split} (before grouping)",
                 dict(group_rows=1 << 30, split=old_split)))
    for i, c in enumerate(tiles, start=1):
        runs.append((f"tile{i}", _tile_label(c), dict(linear_stats=c, linear_radix=c,
                                                      linear_grad=replace(c, num_stages=max(2, c.num_stages - 1)))))
    x, w, y = P.linear_inputs(case, device)
    ok = True
    for row, label, over in runs:

        def fwd():
            return linear_logprobs(x, w, y, backend="triton")

        def fwdbwd():
            out = fwd()
            (out.logprobs.sum() + out.entropy.sum()).backward()

        try:
            with C.override(**over):
                t_fwd = _time_fn(fwd, device, grad_to_none=[x, w])
                t_all = _time_fn(fwdbwd, device, grad_to_none=[x, w])
            rec("perf", shape=[n, h, v], dtype=dtype, row=row, label=label, status="ok", fwd_ms=t_fwd * 1e3,
                fwdbwd_ms=t_all * 1e3, gemms_fwd=1, gemms_fwdbwd=4, tflops_fwd=2 * n * h * v / t_fwd / 1e12,
                tflops_fwdbwd=8 * n * h * v / t_all / 1e12)
            print(f"  {label}: fwd {t_fwd * 1e3:.2f} ms, fwd+bwd {t_all * 1e3:.2f} ms")
        except Exception as e:
            ok = row != "tile0" and ok  # a candidate that does not compile is information; the shipped one must run
            rec("perf", shape=[n, h, v], dtype=dtype, row=row, label=label, status="error",
                why=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:300]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # where each build's programs per SM came from (the compiled kernel, or the assumed fallback)
    from fused_entropy._launch_plan import occupancy_report

    for build, index, occ, source in occupancy_report():
        rec("occupancy", build=[str(b) for b in build], device_index=index, programs_per_sm=occ, source=source)
        print(f"  occupancy {build[0]} {build[1]}: {occ} programs/SM ({source})")
    return ok


def _tile_label(c) -> str:
    return f"tile {c.block_n}x{c.block_v}x{c.block_h} w{c.num_warps} s{c.num_stages}"


STEP_FNS = {"env": step_env, "correctness": step_correctness, "perf": step_perf, "tiles": step_tiles,
            "tests": step_tests}


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def _target_value(row: str, measure: str, plain: dict, at_shape: Dict[str, dict]):
    """(value, format) of one ``TARGETS`` entry from the plain fused row and the other rows at the target
    shape, or (None, why it is missing)."""
    if row == "fused":
        if measure == "mem_per_nv":
            value = plain.get(measure)
            return (value, "{:.2f}") if value is not None else (None, "not measured")
        return plain[f"{measure}_ms"], "{:.1f}"
    other = at_shape.get(row)
    if other is None:
        return None, "not measured"
    if other.get("status") != "ok":
        return None, f"{row}: {other.get('status')}"
    per_token = lambda r: r[f"{measure}_ms"] / r.get("tokens", TARGET_SHAPE[0])
    return per_token(other) / per_token(plain), "{:.2f}"


def _targets_table(recs: List[dict]) -> List[str]:
    """The summary's verdict on ``TARGETS``: measured value, bound and whether it is met, from the bf16
    perf rows at ``TARGET_SHAPE``; nothing is judged from other shapes or dtypes. The correctness step's
    determinism check (at its own shape) is reported beside it."""
    at_shape = {r["row"]: r for r in recs if r.get("kind") == "perf" and tuple(r.get("shape", ())) == TARGET_SHAPE
                and r.get("dtype") == "bfloat16"}
    info = next((r for r in recs if r.get("kind") == "info"), {})
    lines = ["", f"## Targets (docs/PERFORMANCE.md), bf16 at (N, H, V) = {TARGET_SHAPE}", ""]
    gpu = info.get("gpu")
    if gpu and not any(name in gpu for name in ("H100", "H200")):
        lines += [f"- the bounds are for one H100/H200; this run is on {gpu}", ""]
    plain = at_shape.get("fused")
    if plain is None or plain.get("status") != "ok":
        why = "no plain fused perf row at this shape in bf16" if plain is None else f"the plain fused row: {plain.get('status')}"
        lines += [f"- not judged: {why}. The targets need the perf step on a GPU at its default shapes "
                  "(`fused-entropy gpucheck` without `--quick`; a `--quick` run times tiny shapes only).", "",
                  "| target | bound |", "|---|---|"]
        lines += [f"| {what} | {bound:g} |" for what, _, _, bound in TARGETS]
    else:
        lines += ["| target | measured | bound | met |", "|---|---|---|---|"]
        for what, row, measure, bound in TARGETS:
            value, fmt = _target_value(row, measure, plain, at_shape)
            if value is None:
                lines.append(f"| {what} | {fmt} | {bound:g} | - |")
            else:
                lines.append(f"| {what} | {fmt.format(value)} | {bound:g} | {'yes' if value <= bound else '**NO**'} |")
    on_gpu = str(info.get("device", "")).startswith("cuda")
    for r in (r for r in recs if r.get("kind") == "check" and r.get("name") == "determinism 3 runs"):
        bits = r.get("fwd_max_abs") == 0 and r.get("bwd_max_abs") == 0
        where = ("" if on_gpu else "; on a CPU through the interpreter, which runs programs one after another: "
                 "not evidence for a GPU")
        lines += ["", f"- run-to-run determinism, from the correctness step ({r.get('dtype', '')} at "
                      f"{tuple(r.get('shape', ()))}{where}): forward and backward bitwise equal over 3 runs: "
                      f"{'yes' if bits else '**NO**'} (max |diff| fwd {r.get('fwd_max_abs')}, bwd {r.get('bwd_max_abs')})"]
    return lines


def summarize(recs: List[dict]) -> str:
    lines = ["# fused-entropy gpucheck", ""]
    info = next((r for r in recs if r.get("kind") == "info"), {})
    if info:
        what = info.get("gpu") or info.get("cpu") or info.get("device")
        lines.append(f"- machine: {what}; torch {info.get('torch')}, triton {info.get('triton')}, "
                     f"fused-entropy {info.get('fused_entropy')} ({info.get('commit', '?')})")
        if info.get("gpu"):
            lines.append(f"- {info.get('sms')} SMs, driver {info.get('driver', '?')}, SM clock {info.get('clock_sm', '?')} "
                         f"(max {info.get('clock_sm_max', '?')}), allow_tf32 {info.get('allow_tf32_matmul')}")
    for r in recs:
        if r.get("kind") == "ceiling":
            if r["name"] == "matmul":
                lines.append(f"- ceiling: {r['dtype']} matmul {r['shape'][0]}^3: {_f(r['tflops'], '{:.3g}')} TFLOP/s")
            else:
                lines.append(f"- ceiling: device copy {_f(r['gbs'], '{:.0f}')} GB/s (read + write)")
    steps = [r for r in recs if r.get("kind") == "step"]
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    for r in steps:
        lines.append(f"| {r['step']} | {r['status']} | {_f(r.get('seconds'), '{:.0f}')} |")
    checks = [r for r in recs if r.get("kind") in ("check", "error", "skip") and r.get("section") == "correctness"]
    if checks:
        lines += ["", "## Correctness (relative error vs fp64; torch = plain torch at the same precision)", "",
                  "| check | dtype | error | torch | bound | ok |", "|---|---|---|---|---|---|"]
        for r in checks:
            if r["kind"] == "check" and "err" in r:
                lines.append(f"| {r['name']} | {r['dtype']} | {_f(r['err'], '{:.2e}')} | {_f(r['torch_err'], '{:.2e}')} "
                             f"| {_f(r['bound'], '{:.1e}')} | {'yes' if r['ok'] else '**NO**'} |")
            elif r["kind"] == "check":
                extra = {k: v for k, v in r.items() if k not in ("section", "kind", "name", "ok")}
                lines.append(f"| {r['name']} | | {json.dumps(extra, default=str)[:160]} | | | {'yes' if r['ok'] else '**NO**'} |")
            elif r["kind"] == "error":
                lines.append(f"| {r.get('name')} | | error: {r.get('error', '')[:160]} | | | **NO** |")
            else:
                lines.append(f"| {r.get('name')} | | skipped: {r.get('why', '')} | | | - |")
    perf = [r for r in recs if r.get("kind") == "perf"]
    if perf:
        lines += ["", "## Performance (medians; % = of the measured matmul ceiling)", "",
                  "| shape N,H,V | row | fwd ms | fwd+bwd ms | GEMMs | TFLOP/s | % ceiling | x floor | peak MiB | mem/[N,V] |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        floors = {tuple(r["shape"]): r for r in perf if r.get("row") == "floor" and r.get("status") == "ok"}
        for r in perf:
            shape = ",".join(map(str, r["shape"]))
            if r.get("status") != "ok":
                lines.append(f"| {shape} | {r['label']} | {r['status']}: {str(r.get('why', ''))[:100]} | | | | | | | |")
                continue
            fl = floors.get(tuple(r["shape"]))
            xf = r["fwdbwd_ms"] / fl["fwdbwd_ms"] if fl else None
            lines.append(f"| {shape} | {r['label']} | {_f(r['fwd_ms'])} | {_f(r['fwdbwd_ms'])} | {r['gemms_fwdbwd']} | "
                         f"{_f(r['tflops_fwdbwd'], '{:.3g}')} | {_f(r.get('pct_ceiling_fwdbwd'), '{:.0f}')} | {_f(xf)} | "
                         f"{_f(r.get('peak_mib'), '{:.0f}')} | {_f(r.get('mem_per_nv'), '{:.3f}')} |")
    lines += _targets_table(recs)
    occ = [r for r in recs if r.get("kind") == "occupancy"]
    if occ:
        lines += ["", "## Occupancy the launcher used (programs per SM, and where the number came from)", "",
                  "| build | programs/SM | source |", "|---|---|---|"]
        lines += [f"| {' '.join(r['build'][:2])} | {r['programs_per_sm']} | {r['source'][:120]} |" for r in occ]
    prof = [r for r in recs if r.get("kind") == "profile" and r.get("kernels")]
    for r in prof:
        lines += ["", f"## Fused forward+backward by kernel, {tuple(r['shape'])}, {r.get('label', 'log-prob + entropy')}", "",
                  "| ms | calls | kernel |", "|---|---|---|"]
        lines += [f"| {k['ms']:.2f} | {k['calls']} | `{k['kernel']}` |" for k in r["kernels"]]
    tests = [r for r in recs if r.get("kind") == "tests"]
    for r in tests:
        c = r.get("counts", {})
        lines += ["", "## Tests", "", f"- {len(r['files'])} files on {r['device']} ({r['workers']} workers): "
                  + ", ".join(f"{v} {k}" for k, v in c.items()) + f"; rc {r['rc']}, {r['seconds']} s"
                  + (" (TIMED OUT)" if r.get("timed_out") else "")]
        lines += [f"  - `{f}`" for f in r.get("failures", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def build_parser(prog: str = "fused-entropy gpucheck") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for results.jsonl and summary.md (created if missing)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI; on CPU through the interpreter)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all steps (default 420)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--shapes", nargs="*", help="perf shapes as N,H,V (default: the four target shapes)")
    ap.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--step-cap", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap


def _fail(msg: str) -> int:
    print(f"fused-entropy gpucheck: error: {msg}", file=sys.stderr)
    return 2


def _validate(args) -> Optional[str]:
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        return f"--budget-s must be a positive number of seconds, got {args.budget_s}"
    if args.budget_s < MIN_BUDGET_S:
        return f"--budget-s {args.budget_s:g} is too small to run any step (at least {MIN_BUDGET_S} s)"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        return f"--sections takes a comma-separated subset of {','.join(SECTIONS)}, got {args.sections!r}"
    for spec in args.shapes or []:
        parts = spec.split(",")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            return f"--shapes takes N,H,V with positive integers, got {spec!r}"
        n, h, v = map(int, parts)
        if max(n * h, n * v, h * v) > MAX_SHAPE_ELEMENTS:
            return (f"--shapes {spec}: a [N,H], [N,V] or [V,H] tensor of over {MAX_SHAPE_ELEMENTS:.0e} elements "
                    "does not fit a GPU")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"--out {args.out!r} is not a writable folder ({e.strerror or e})"
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda, but torch sees no CUDA device"
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    from fused_entropy.backends import interpreting

    if on_cpu and not interpreting() and set(sections) & {"correctness", "perf", "tests"}:
        return ("on a CPU the Triton kernels run only through the interpreter: set TRITON_INTERPRET=1 "
                "(TRITON_INTERPRET=1 fused-entropy gpucheck --quick ...), or check --sections env alone")
    if not args.quick and on_cpu:
        return ("the full check needs a GPU (its shapes take hours on a CPU); torch sees none here: "
                "add --quick for the tiny-shape run (with TRITON_INTERPRET=1 for the Triton kernels)")
    return None


def _run_step(args, step: str, cap: float, rec: Recorder) -> str:
    cmd = [sys.executable, "-m", "fused_entropy.tools.gpucheck", "--step", step, "--out", args.out,
           "--device", args.device, "--step-cap", str(cap)]
    if args.quick:
        cmd.append("--quick")
    if args.shapes:
        cmd += ["--shapes", *args.shapes]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    print(f"== {step} (cap {cap:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=cap)
        status = {0: "ok", 1: "failed"}.get(rc, f"crashed (exit {rc})")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timed out"
    rec("step", step=step, status=status, seconds=round(time.time() - t0, 1), cap=cap)
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.step:  # child: one step
        rec = Recorder(args.out, STEPS[args.step][0])
        try:
            return 0 if STEP_FNS[args.step](args, rec) else 1
        except Exception as e:
            rec("error", name=args.step, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
            traceback.print_exc()
            return 3
    err = _validate(args)
    if err:
        return _fail(err)
    path = os.path.join(args.out, "results.jsonl")
    if os.path.exists(path):
        os.replace(path, path + f".{int(time.time())}.old")
    deadline = time.time() + args.budget_s
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    rec = Recorder(args.out, "gpucheck")
    statuses = []
    for step in [st for sec in SECTIONS if sec in sections for st in SECTION_STEPS[sec]]:
        left = deadline - time.time()
        cap = min(STEPS[step][2 if args.quick else 1], left)
        if cap < 5:
            rec("step", step=step, status="skipped (budget spent)", seconds=0, cap=0)
            statuses.append("skipped")
            continue
        statuses.append(_run_step(args, step, cap, rec))
    text = summarize(read_results(args.out))
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(s == "ok" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
