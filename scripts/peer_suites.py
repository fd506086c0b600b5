"""Run the peers' own GRPO test suites with fused-entropy swapped in: an oracle nobody here wrote.

    python scripts/peer_suites.py [--backend torch|triton] [--subset] [--stock] [--timeout S] [--workdir DIR]

Liger: downloads the source distribution of the installed liger-kernel from the package index
(nothing of it is committed), unpacks its ``test/`` folder into a scratch directory and runs
``test/chunked_loss/test_grpo_loss.py`` on CPU twice: stock, and with
``fused_entropy.integrations.liger.patch(backend=...)`` applied before collection (a pytest plugin
written into the scratch directory), so every ``LigerFusedLinearGRPOLoss`` the suite builds is this
package's ``LinearGRPOLoss``. It then lists the tests that fail only when swapped. Those must be
empty, or be listed in ``KNOWN`` with the reason (each entry was checked against an fp64
recomputation).

TRL publishes no tests in its source distribution; its GRPO entropy tests are mirrored by
``tests/test_integration_trl.py`` in this repository instead.

``--subset`` runs a fixed, quick selection (a few minutes on 2 cores; what CI runs). Exit status:
0 when no test fails only in the swapped run (outside ``KNOWN``), 1 otherwise, 2 when the suite
could not be fetched (the package index unreachable: CI only warns), 3 when it was fetched but could
not run to the end (a timeout, a collection or internal pytest error: CI fails).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

SUITE = "test/chunked_loss/test_grpo_loss.py"
# a quick selection for CI: the constructor/forward contract, normalizers, frozen heads and a
# slice of the correctness grid
SUBSET = ("sequence_level_rejects or num_items_in_batch or frozen or ref_per_token_logps "
          "or (test_correctness and float32 and not bias and grpo)")
# test id -> why it fails only when swapped, checked by hand
KNOWN = {
    # test_correctness ids read [delta-level-loss_type-refs-beta-eps_low-eps_high-T-bias-scalar-dtype-atol-
    # rtol-B-T-H-V] with dtype0 = bf16: the 24 bf16 luspo sequence-level cases at 8x128x1024x4096 (the
    # issue saw 6 of them fail; which ones depends on the suite's RNG order). Recomputed in fp64 with
    # the suite's own TorchLMHeadGRPO, the test's bf16 reference gradient is 0.02-0.28 off (0.22-0.34 in
    # the run) while this package's is within 0.0035 (README, "Drop-in for Liger's fused GRPO loss")
    r"test_correctness\[(None|2\.0)-sequence-luspo-.*-dtype0-0\.1-0\.5-8-128-1024-4096\]":
        "the test's bf16 reference is the one off (fp64 check)",
}
# tests that fail in the stock suite too on a CPU (checked with --stock, 2026-11-30, liger-kernel
# 0.8.5): they test Liger's own Triton GRPO loss, which nothing here replaces
STOCK_FAILURES = {
    "test_triton_grpo_loss_matches_reference[bnpo-0.0]", "test_triton_grpo_loss_matches_reference[dapo-0.04]",
}

PLUGIN = '''
import os


def pytest_configure(config):
    from fused_entropy.integrations import liger

    liger.patch(backend=os.environ["FUSED_ENTROPY_PEER_BACKEND"])
'''


def fetch_liger(workdir: str) -> str:
    version = importlib.metadata.version("liger-kernel")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"liger-kernel=={version}", "-d", workdir], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip download liger-kernel=={version} failed:\n{r.stderr[-2000:]}")
    sdist = next(os.path.join(workdir, f) for f in os.listdir(workdir) if f.endswith(".tar.gz"))
    root = os.path.join(workdir, f"liger_kernel-{version}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/test/" in m.name or m.name.endswith("/test")]
        tar.extractall(workdir, members=members, filter="data")
    if not os.path.exists(os.path.join(root, SUITE)):
        raise RuntimeError(f"{SUITE} is not in liger-kernel {version}'s source distribution")
    with open(os.path.join(root, "fused_entropy_swap.py"), "w") as f:
        f.write(PLUGIN)
    return root


def run_suite(root: str, swapped: bool, backend: str, subset: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", SUITE]
    if subset:
        cmd += ["-k", SUBSET]
    if swapped:
        cmd[3:3] = ["-p", "fused_entropy_swap"]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               FUSED_ENTROPY_PEER_BACKEND=backend)
    env.pop("TRITON_INTERPRET", None)
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    last = out.strip().splitlines()[-1] if out.strip() else ""
    counts = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) \S+::(\S+)", out, flags=re.M)))
    return {"rc": rc, "counts": counts, "failed": failed, "seconds": round(time.time() - t0), "tail": out[-3000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("torch", "triton"), default="torch",
                    help="LinearGRPOLoss backend in the swapped run (triton runs under TRITON_INTERPRET=1)")
    ap.add_argument("--subset", action="store_true", help="the quick selection CI runs")
    ap.add_argument("--stock", action="store_true", help="also run the stock suite, to compare failures")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per suite run")
    ap.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.timeout <= 0:
        ap.error(f"--timeout must be positive, got {args.timeout}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="peer_suites_")
    os.makedirs(workdir, exist_ok=True)
    try:
        root = fetch_liger(workdir)
    except Exception as e:
        print(f"peer_suites: {e}", file=sys.stderr)
        return 2
    version = importlib.metadata.version("liger-kernel")
    runs = {}
    for name, swapped in (("stock", False), ("swapped", True)):
        if name == "stock" and not args.stock:
            continue
        runs[name] = res = run_suite(root, swapped, args.backend, args.subset, args.timeout)
        print(f"liger-kernel {version} {SUITE} ({'subset' if args.subset else 'full'}), {name}"
              f"{' [' + args.backend + ']' if swapped else ''}: {res['counts']} in {res['seconds']} s"
              + (" (TIMED OUT)" if res["rc"] is None else ""), flush=True)  # a full run takes long: show each
        if res["rc"] not in (0, 1):
            print(res["tail"])
            return 3
    stock_failed = set(runs["stock"]["failed"]) if "stock" in runs else set(STOCK_FAILURES)
    only_swapped = [t for t in runs["swapped"]["failed"] if t not in stock_failed]
    unexplained = [t for t in only_swapped if not any(re.fullmatch(p, t) for p in KNOWN)]
    for t in only_swapped:
        why = next((w for p, w in KNOWN.items() if re.fullmatch(p, t)), "UNEXPLAINED")
        print(f"  fails only swapped: {t}: {why}")
    seen_stock = sorted(t for t in runs["swapped"]["failed"] if t in stock_failed)
    if seen_stock:
        source = "--stock run" if "stock" in runs else "STOCK_FAILURES; --stock checks again"
        print(f"  fails stock too ({len(seen_stock)}, {source}): " + ", ".join(seen_stock[:10]))
    print(f"peer suites: {len(unexplained)} unexplained and {len(only_swapped) - len(unexplained)} known "
          "failures that only the swapped run has")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
