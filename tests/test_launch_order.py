"""Launch order and vocabulary split of the GEMM kernels (``kernels/_grid.py``, ``_launch_plan``).

- the grouped launches (``grouped_launches`` + ``grouped_program``) visit every (row block, column)
  exactly once, a group's programs first and the row block fastest within a group (a tiny kernel
  writes out what each program was given, at its launch-order position);
- the linear head's forward, clamped forward, vocabulary-parallel select and backward give the same
  bits whatever the group size and split (the order decides when a program runs, never what it
  computes), and match the fp64 reference, on ragged shapes with groups that do not divide the
  row blocks;
- ``whole_waves`` (the split) and ``configs.programs_per_sm`` (occupancy) by their rules, and
  ``programs_per_sm`` reading a compiled kernel, falling back with a warning when it cannot, and, on
  CUDA, reading the real one.

Runs on CUDA, or on CPU with TRITON_INTERPRET=1 (the pure functions anywhere).
"""
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from fused_entropy import _launch, _launch_plan
from fused_entropy import reference as R
from fused_entropy._types import LogitTransform
from fused_entropy.kernels import configs as C
from fused_entropy.kernels._grid import grouped_program

from conftest import DEVICE, TRITON_SKIP

F64 = torch.float64
TINY = C.Config(8, 16, 16)


@triton.jit
def _order_probe(out_ptr, block0):
    pid_n, pid_c = grouped_program(block0)
    # the linear launch-order id of this program within its launch, x fastest
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    base = out_ptr + 2 * (block0 * tl.num_programs(1) + pid)
    tl.store(base, pid_n)
    tl.store(base + 1, pid_c)


@TRITON_SKIP
@pytest.mark.parametrize("n_rows,n_cols,group", [(5, 3, 2), (1, 1, 1), (7, 4, 3), (4, 5, 10), (6, 1, 4), (9, 2, 1),
                                                 (3, 7, 3)])
def test_grouped_launches_visit_every_tile_once_in_group_order(n_rows, n_cols, group):
    group = min(group, n_rows)
    out = torch.full((n_rows * n_cols, 2), -1, dtype=torch.int32, device=DEVICE)
    launches = _launch_plan.grouped_launches(n_rows, group)
    for rows, groups, block0 in launches:
        _order_probe[(rows, n_cols, groups)](out, block0)
    # launches in order, each in launch order: a group's programs, row block fastest, then the next group
    pairs = [tuple(p) for p in out.cpu().tolist()]
    assert sorted(pairs) == [(r, c) for r in range(n_rows) for c in range(n_cols)]
    want = [(r, c) for first in range(0, n_rows, group) for c in range(n_cols)
            for r in range(first, min(n_rows, first + group))]
    assert pairs == want
    assert len(launches) == (1 if n_rows % group == 0 else 1 + (n_rows >= group))


def _inputs(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * 2
    w = torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)
    w[7:10] = w[6]  # a tie group, so the clamped statistics' tie rule is exercised
    b = torch.randn(v, generator=g, dtype=F64)
    b[7:10] = b[6]
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100
    return tuple(t.to(DEVICE) for t in (x, w, b, y))


def _all_outputs(x, w, b, y, k, group, split):
    tf = LogitTransform(softcap=5.0)
    forced = dict(group_rows=group) if split is None else dict(group_rows=group, split=split)
    with C.override(linear_stats=TINY, linear_grad=TINY, linear_radix=TINY, **forced):
        stats = _launch.linear_stats(x, w, b, y, tf, -100, True, k)
        n = x.shape[0]
        gen = torch.Generator().manual_seed(3)
        g = [torch.randn(n, generator=gen, dtype=F64).to(DEVICE) for _ in range(3)]
        grads = _launch.linear_grad(x, w, b, y, tf, -100, stats, *g)
        shift = stats.m.clone()
        select = _launch.linear_topk_select(x, w, b, tf, k, shift, lambda t: t)
    return stats, grads, select, g


@TRITON_SKIP
def test_results_do_not_depend_on_group_or_split_and_match_fp64():
    # 45 rows in blocks of 8: 6 row blocks; groups 1, 4 (not dividing 6) and 6 (the plain order)
    x, w, b, y = _inputs(45, 24, 53)
    k = 5
    # (4, None): the launcher's own split (whole waves for the interpreter's 4 "SMs" x 2) with groups of 4
    runs = {(group, split): _all_outputs(x, w, b, y, k, group, split)
            for group, split in [(1, 1), (4, 3), (6, 2), (4, None)]}
    (stats0, grads0, sel0, g), *others = runs.values()
    for stats, grads, sel, _ in others:
        # the split changes the order in which the online states are merged; the group nothing
        for name in ("m", "tau", "tie_frac"):
            assert torch.equal(getattr(stats, name), getattr(stats0, name)), name
        for a, a0 in zip(grads, grads0):
            torch.testing.assert_close(a, a0, rtol=1e-13, atol=1e-13)
        assert torch.equal(sel[0], sel0[0]) and torch.equal(sel[1], sel0[1])
    # same split, different groups: bitwise equal everywhere
    same = [_all_outputs(x, w, b, y, k, group, 3) for group in (1, 4)]
    for t, t0 in zip(same[0][0], same[1][0]):
        assert (t is None and t0 is None) or torch.equal(t, t0)
    for t, t0 in zip(same[0][1], same[1][1]):
        assert torch.equal(t, t0)
    for t, t0 in zip(same[0][2], same[1][2]):
        assert torch.equal(t, t0)
    # and every run against the fp64 reference
    ref = R.linear_logprobs(x, w, y, bias=b, softcap=5.0, topk=k)
    valid = y != -100
    for stats, *_ in runs.values():
        torch.testing.assert_close(stats.logprobs[valid], ref.logprobs[valid], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.entropy, ref.entropy, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.clamped_entropy, ref.clamped_entropy, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the split: whole waves
# ---------------------------------------------------------------------------------------------


def _efficiency(n_blocks, n_vtiles, slots, split, per, group=None):
    # the launches of a grouped order run one after the other, each in its own waves
    sizes = [n_blocks] if group is None or group >= n_blocks else \
        [n_blocks // group * group] + ([n_blocks % group] if n_blocks % group else [])
    waves = sum(math.ceil(rows * split / slots) for rows in sizes if rows)
    return n_blocks * n_vtiles / (waves * per * slots)


@pytest.mark.parametrize("n_blocks", [1, 3, 8, 25, 64, 74, 200])
@pytest.mark.parametrize("n_vtiles", [1, 7, 512, 2048, 2374])
@pytest.mark.parametrize("slots,group", [(264, 25), (132, 25), (132, 1000), (4, 2)])
def test_whole_waves_rules(n_blocks, n_vtiles, slots, group):
    split, per = _launch_plan.whole_waves(n_blocks, n_vtiles, slots, group)
    # a partition of the vocabulary tiles into `split` runs of at most `per`, none empty
    assert 1 <= split <= n_vtiles and split * per >= n_vtiles and (split - 1) * per < n_vtiles
    # with groups smaller than the batch, the programs running at once span about one group
    if group < n_blocks:
        assert split >= min(n_vtiles, math.ceil(slots / group))
    # no split in the searched range fills the waves more than 1% better
    eff = _efficiency(n_blocks, n_vtiles, slots, split, per, group)
    lo = 1 if group >= n_blocks else min(n_vtiles, math.ceil(slots / group))
    for s in range(lo, min(n_vtiles, max(4 * lo, 4 * math.ceil(slots / n_blocks), 64)) + 1):
        p = math.ceil(n_vtiles / s)
        if math.ceil(n_vtiles / p) >= lo:
            assert _efficiency(n_blocks, n_vtiles, slots, math.ceil(n_vtiles / p), p, group) <= eff + 0.01 + 1e-12
    # enough work for several waves fills them to within 10%
    if n_blocks * n_vtiles >= 8 * slots:
        assert eff >= 0.9, (split, per, eff)


def test_whole_waves_documented_examples():
    assert _launch_plan.whole_waves(64, 2048, 264, 16) == (33, 63)  # 8 whole waves of 264
    assert _launch_plan.whole_waves(64, 2048, 132, 16) == (33, 63)  # 16 whole waves of 132


def test_group_rows_fits_l2_share_and_override():
    cpu = torch.device("cpu")
    # 1 MiB panels (128 rows x 4096 x bf16) in half of the assumed 50 MiB L2: at most 25, and the
    # largest divisor of the row blocks from 13 up (one launch), else 25
    mib = 128 * 4096 * 2
    assert _launch_plan.group_rows(75, mib, cpu) == 25
    assert _launch_plan.group_rows(64, mib, cpu) == 16
    assert _launch_plan.group_rows(67, mib, cpu) == 25  # prime: 2 groups of 25, then 17 in a second launch
    assert _launch_plan.grouped_launches(67, 25) == [(25, 2, 0), (17, 1, 50)]
    assert _launch_plan.group_rows(10, mib, cpu) == 10
    assert _launch_plan.group_rows(64, 2**40, cpu) == 1
    # grid z holds the groups: at most 65535 of them, forced or not
    for n_blocks in (65535, 65537, 131071, 200_000):
        for forced in ({}, {"group_rows": 1}):
            with C.override(**forced):
                g = _launch_plan.group_rows(n_blocks, 2**40, cpu)
            assert all(groups <= 65535 for _, groups, _ in _launch_plan.grouped_launches(n_blocks, g)), (n_blocks, g)
    with C.override(group_rows=3):
        assert _launch_plan.group_rows(64, 1, cpu) == 3
        assert _launch_plan.group_rows(2, 1, cpu) == 2
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="group_rows"):
            with C.override(group_rows=bad):
                pass


# ---------------------------------------------------------------------------------------------
# occupancy
# ---------------------------------------------------------------------------------------------


def test_programs_per_sm_by_hand():
    # the shipped bf16 forward on sm_90 per the AOT gate: 127 registers, 62464 B shared, 8 warps:
    # registers allow 65536 // (128 * 256) = 2, shared memory 233472 // 63488 = 3, threads 8
    assert C.programs_per_sm(127, 62464, 8) == 2
    # its top-k + logits-buffer build: 253 registers -> 256 per thread -> 1
    assert C.programs_per_sm(253, 66560, 8) == 1
    # shared memory bound: 4 x 56 KiB + 4 KiB reserved = 228 KiB is exactly full
    assert C.programs_per_sm(32, 56 * 1024, 4) == 4
    assert C.programs_per_sm(32, 56 * 1024 + 1, 4) == 3
    # threads bound, and sm_80's smaller shared memory
    assert C.programs_per_sm(16, 0, 4) == 16
    assert C.programs_per_sm(64, 100 * 1024, 4, shared_per_sm=164 * 1024) == 1
    # a block that does not fit at all
    assert C.programs_per_sm(255, 300 * 1024, 8) == 0


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(_launch_plan, "_on_gpu", lambda device: True)
    monkeypatch.setattr(_launch_plan, "_sm_limits", lambda device: dict(regs_per_sm=65536, shared_per_sm=228 * 1024,
                                                                         threads_per_sm=2048))
    monkeypatch.setattr(_launch_plan, "_OCCUPANCY", {})
    monkeypatch.setattr(_launch_plan, "_OCCUPANCY_WARNED", set())


def test_programs_per_sm_reads_the_compiled_kernel(monkeypatch):
    _fake_cuda(monkeypatch)
    calls = []

    class Compiled:
        n_regs = 253
        metadata = SimpleNamespace(shared=66560, num_warps=8)

        def _init_handles(self):
            calls.append("init")

    dev = torch.device("cuda", 0)
    assert _launch_plan.programs_per_sm(("k", 1), dev, Compiled) == 1
    assert _launch_plan.programs_per_sm(("k", 1), dev, Compiled) == 1  # cached: compiled once
    assert calls == ["init"]
    (key, index, occ, source), = _launch_plan.occupancy_report()
    assert key == ("k", 1) and occ == 1 and source.startswith("compiled: 253 registers")


def test_programs_per_sm_falls_back_with_a_warning(monkeypatch):
    _fake_cuda(monkeypatch)

    def broken():
        raise AttributeError("no n_regs here")

    with pytest.warns(RuntimeWarning, match="could not read the occupancy of the compiled k"):
        assert _launch_plan.programs_per_sm(("k", 2), torch.device("cuda", 0), broken) == C.PROGRAMS_PER_SM
    (_, _, occ, source), = _launch_plan.occupancy_report()
    assert source.startswith("assumed: AttributeError")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel
        _launch_plan.programs_per_sm(("k", 3), torch.device("cuda", 0), broken)


@pytest.mark.skipif(DEVICE != "cuda", reason="reads a kernel compiled for this GPU")
def test_programs_per_sm_from_a_real_compiled_kernel():
    x, w, b, y = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in _inputs(300, 64, 1000))
    tf = LogitTransform()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the assumed occupancy fails here
        _launch.linear_stats(x, w, b, y, tf, -100, True, None)
        stats = _launch.linear_stats(x, w, b, y, tf, -100, True, 5)  # top-k: the logits-buffer build
        _launch.linear_topk_select(x, w, b, tf, 5, stats.m.clone(), lambda t: t)
    rows = [r for r in _launch_plan.occupancy_report() if r[0][1] == "bf16"]
    kinds = {(r[0][0], r[0][5] if r[0][0] == "linear_stats" else None) for r in rows}
    assert {("linear_stats", False), ("linear_stats", True), ("linear_radix", None)} <= kinds, rows
    assert all(src.startswith("compiled:") and occ >= 1 for _, _, occ, src in rows), rows


def test_override_refuses_removed_and_ill_typed_settings():
    with pytest.raises(ValueError, match="backward=.* was removed"):
        with C.override(backward="atomic"):
            pass
    for name, bad in (("group_rows", True), ("split", False), ("grad_buffer_bytes", "x"),
                      ("logits_buffer_bytes", True), ("grad_buffer_bytes", 0)):
        with pytest.raises(ValueError, match=name):
            with C.override(**{name: bad}):
                pass


def test_no_rows_launch_nothing():
    assert _launch_plan.whole_waves(0, 100, 264, 16) == (1, 100)
    assert _launch_plan.grouped_launches(0, 1) == []
