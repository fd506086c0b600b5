"""Top-k clamped entropy (MATH.md section 3) on both backends against the fp64 reference.

torch: fp64 to 1e-10 through the chunked backend, ties compared per (row, value) group.

Triton: forward and gradients against the fp64 reference (torch.topk on materialized logits), the
row statistics (tau, tie_frac) exactly against the torch backend, for k from 1 to V, ties, -inf
logits and ignored rows, through both entry points. With ties at the boundary torch.topk keeps
arbitrary members of the tie group while the fused backends weight every member by tie_frac, so
gradients are compared per (row, tie group) sums. Runs on CUDA, or on CPU with TRITON_INTERPRET=1;
small blocks force several tiles and splits.
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy._types import LogitTransform
from fused_entropy.backends import torch_chunked
from fused_entropy.kernels import configs as C

from _inputs import linear_inputs, logits_inputs, tie_columns
from conftest import DEVICE, TRITON_SKIP

F64 = torch.float64
TORCH_V = 67  # the torch tests' vocabulary
V = 101  # the Triton tests' vocabulary


def data(n=11, h=12, v=TORCH_V, seed=0):
    x, w, b, y = linear_inputs(n, h, v, seed=seed, scale=2.0)
    y[3] = -100
    return x, w, b, y


def ks():
    return {"k1": dict(topk=1), "k2": dict(topk=2), "k64": dict(topk=64), "kV-1": dict(topk=TORCH_V - 1),
            "kV": dict(topk=TORCH_V), "p0": dict(clamp_p=0.0), "p02": dict(clamp_p=0.2), "p033": dict(clamp_p=0.33),
            "p0999": dict(clamp_p=0.999)}


@pytest.mark.parametrize("kset", list(ks()), ids=list(ks()))
@pytest.mark.parametrize("tf", [dict(), dict(temperature=0.7, softcap=3.0)], ids=["plain", "temp-softcap"])
def test_linear_clamped_matches_reference(kset, tf, monkeypatch):
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(torch_chunked, "MIN_CHUNK_ROWS", 1)
    x, w, b, y = data()
    kw = {**ks()[kset], **tf}
    g = torch.Generator().manual_seed(9)
    up = [torch.randn(11, generator=g, dtype=F64) for _ in range(3)]
    xa, wa, ba = (t.clone().requires_grad_(True) for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch", **kw)
    ref = R.linear_logprobs(xr, wr, y, bias=br, **kw)
    torch.testing.assert_close(out.clamped_entropy, ref.clamped_entropy, rtol=1e-10, atol=1e-10)
    assert torch.all(out.clamped_entropy[3] == 0)
    # clamped alone, then all three outputs together
    for sel in ((0, 0, 1), (1, 1, 1)):
        w_up = [u * s for u, s in zip(up, sel)]
        la = sum((o * u).sum() for o, u in zip(out, w_up))
        lr = sum((o * u).sum() for o, u in zip(ref, w_up))
        ga = torch.autograd.grad(la, (xa, wa, ba), retain_graph=True)
        gr = torch.autograd.grad(lr, (xr, wr, br), retain_graph=True)
        for a, r in zip(ga, gr):
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_p0_and_kV_equal_full_entropy():
    x, w, b, y = data()
    out = fe.linear_logprobs(x, w, y, bias=b, clamp_p=0.0, backend="torch")
    torch.testing.assert_close(out.clamped_entropy, out.entropy, rtol=1e-12, atol=1e-12)


def _tie_logits():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 40, generator=g, dtype=F64).round()  # integers: many exact ties
    z[1] = 0.0  # every logit tied
    z[2, :10] = 1.0 + 1e-12  # near-ties just above an exact tie group
    z[2, 10:25] = 1.0
    z[4, ::3] = -math.inf
    z[5, :-2] = -math.inf  # fewer finite logits than k
    return z


def _tie_groups(z, grad):
    """Sum of the gradient over each (row, value) group: invariant to which tied member topk picks."""
    out = {}
    for r in range(z.shape[0]):
        for val in torch.unique(z[r]):
            sel = z[r] == val
            out[(r, float(val))] = float(grad[r][sel].sum())
    return out


@pytest.mark.parametrize("k", [1, 2, 7, 20, 33, 39, 40])
def test_ties_forward_exact_and_group_gradients(k):
    z = _tie_logits()
    y = torch.zeros(6, dtype=torch.long)
    y[5] = 39
    la = z.clone().requires_grad_(True)
    lr = z.clone().requires_grad_(True)
    out = fe.logprobs_from_logits(la, y, topk=k, backend="torch")
    ref = R.logprobs_from_logits(lr, y, topk=k)
    torch.testing.assert_close(out.clamped_entropy, ref.clamped_entropy, rtol=1e-12, atol=1e-12)
    (ga,) = torch.autograd.grad(out.clamped_entropy.sum(), la)
    (gr,) = torch.autograd.grad(ref.clamped_entropy.sum(), lr)
    assert torch.isfinite(ga).all()
    a, r = _tie_groups(z, ga), _tie_groups(z, gr)
    assert a.keys() == r.keys()
    for key in a:
        assert math.isclose(a[key], r[key], rel_tol=1e-9, abs_tol=1e-12), key


def test_bf16_clamped_no_worse_than_plain_torch():
    x, w, b, y = data(n=32, h=40, v=200)
    xl, wl, bl = (t.to(torch.bfloat16) for t in (x, w, b))
    gold = R.linear_logprobs(xl.double(), wl.double(), y, bias=bl.double(), clamp_p=0.3).clamped_entropy
    plain = R.linear_logprobs(xl, wl, y, bias=bl, clamp_p=0.3).clamped_entropy
    out = fe.linear_logprobs(xl, wl, y, bias=bl, clamp_p=0.3, backend="torch").clamped_entropy
    assert out.dtype == torch.float32
    assert (out.double() - gold).abs().max() <= (plain.double() - gold).abs().max() * 1.1 + 1e-6


def test_clamped_single_pass_matches_two_pass():
    from fused_entropy._types import LogitTransform

    x, w, b, y = data()
    g = torch.Generator().manual_seed(2)
    up = [torch.randn(11, generator=g, dtype=F64) for _ in range(3)]
    tf = LogitTransform(0.8, 2.0, 1.1)
    st, gx, gw, gb = torch_chunked.linear_forward_backward(
        x, w, b, y, tf, -100, True, 9, lambda sl, lp, e, c: (up[0][sl], up[1][sl], up[2][sl]), rows_per_chunk=4)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    ref = R.linear_logprobs(xr, wr, y, bias=br, topk=9, temperature=0.8, softcap=2.0, logit_scale=1.1)
    loss = sum((o * u).sum() for o, u in zip(ref, up))
    for a, r in zip((gx, gw, gb), torch.autograd.grad(loss, (xr, wr, br))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(st.clamped_entropy, ref.clamped_entropy, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Triton backend (moved from test_triton_topk.py)
# ---------------------------------------------------------------------------------------------


def small(split=3):
    return C.override(logits_stats=C.Config(4, 16), logits_grad=C.Config(4, 32), logits_radix=C.Config(4, 16),
                      linear_stats=C.Config(16, 16, 16), linear_grad=C.Config(16, 16, 16),
                      linear_radix=C.Config(16, 16, 16), split=split)


def make_logits(n, v=V, *, seed=0, ties=False):
    logits, y = logits_inputs(n, v, seed=seed)
    if ties:
        logits = torch.round(logits)  # about 15 distinct values per row: big tie groups everywhere
    return logits, y


def group_sums(grad, key):
    """Per row, the sum of ``grad`` over each group of equal ``key`` values: [n, n_groups] padded."""
    out = []
    for g_row, k_row in zip(grad, key):
        _, inv = torch.unique(k_row, return_inverse=True)
        out.append(torch.zeros(int(inv.max()) + 1, dtype=grad.dtype, device=grad.device).index_add_(0, inv, g_row))
    width = max(len(o) for o in out)
    return torch.stack([torch.nn.functional.pad(o, (0, width - len(o))) for o in out])


UPSTREAM = {"clamped": (0, 0, 1), "all": (1, 1, 1)}


def _loss(out, up):
    parts = (out.logprobs, out.entropy, out.clamped_entropy)
    return sum((p.double() * u).sum() for p, u in zip(parts, up) if u is not None and p is not None)


def upstream(n, which, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64).to(DEVICE) if s else None for s in UPSTREAM[which]]


def logits_case(logits, y, *, dtype=torch.float32, which="all", atol=2e-5, grouped=False, rows=None, **kw):
    logits, y = logits.to(DEVICE), y.to(DEVICE)
    up = upstream(len(y), which)
    kw = dict(kw, entropy=True)
    ref_in = logits.to(dtype).double().requires_grad_()
    gold = R.logprobs_from_logits(ref_in, y, **kw)
    (g_gold,) = torch.autograd.grad(_loss(gold, up), [ref_in])
    ours_in = logits.to(dtype).requires_grad_()
    with small():
        got = fe.logprobs_from_logits(ours_in, y, backend="triton", **kw)
        (g_got,) = torch.autograd.grad(_loss(got, up), [ours_in])
    sel = slice(None) if rows is None else rows
    for name, a, e in (("logprobs", got.logprobs, gold.logprobs), ("entropy", got.entropy, gold.entropy),
                       ("clamped", got.clamped_entropy, gold.clamped_entropy)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double()[sel], e[sel], atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    g_got = g_got.double()
    assert torch.isfinite(g_got).all()
    if grouped:
        key = ref_in.detach()
        g_got, g_gold = group_sums(g_got[sel], key[sel]), group_sums(g_gold[sel], key[sel])
    g_atol = _grad_atol(dtype, atol, g_gold)
    torch.testing.assert_close(g_got[sel], g_gold[sel], atol=g_atol, rtol=atol)
    return got


def _grad_atol(dtype, atol, g_gold):
    """Gradients come back in the input dtype: for 16-bit inputs allow one ulp of their scale
    (plain torch rounds its gradient to the same dtype)."""
    if dtype in (torch.bfloat16, torch.float16):
        return max(atol, torch.finfo(dtype).eps * g_gold.abs().max().item())
    return atol


def stats_match_torch_backend(logits, y, k, tf=LogitTransform(), ignore_index=-100):
    """RowStats of the Triton backend equal the torch backend's: tau and tie_frac exactly."""
    from fused_entropy.backends import triton as triton_backend

    logits, y = logits.to(DEVICE), y.to(DEVICE)
    with small():
        a = triton_backend.logits_forward(logits, y, tf, ignore_index, True, k)
    b = torch_chunked.logits_forward(logits, y, tf, ignore_index, True, k)
    assert torch.equal(a.tau, b.tau), (a.tau, b.tau)
    assert torch.equal(a.tie_frac, b.tie_frac), (a.tie_frac, b.tie_frac)
    torch.testing.assert_close(a.lse_clamped, b.lse_clamped, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(a.clamped_entropy, b.clamped_entropy, atol=1e-5, rtol=1e-6)


K_CASES = {"k1": dict(topk=1), "k2": dict(topk=2), "k64": dict(topk=64), "kV-1": dict(topk=V - 1),
           "kV": dict(topk=V), "p0": dict(clamp_p=0.0), "p0.2": dict(clamp_p=0.2), "p0.33": dict(clamp_p=0.33),
           "p0.999": dict(clamp_p=0.999)}


@TRITON_SKIP
@pytest.mark.parametrize("kcase", list(K_CASES))
def test_logits_every_k(kcase):
    logits, y = make_logits(7)
    y[2] = -100
    logits_case(logits, y, temperature=0.7, **K_CASES[kcase])


@TRITON_SKIP
@pytest.mark.parametrize("k", [1, 2, 30, 64, V - 1, V])
def test_logits_exact_ties(k):
    logits, y = make_logits(6, ties=True)
    stats_match_torch_backend(logits.float(), y, k)
    logits_case(logits, y, topk=k, grouped=True, which="clamped" if k % 2 else "all")


@TRITON_SKIP
def test_logits_near_ties_at_the_boundary():
    # row 0: values one fp32 ulp apart around the k-th; row 1: +0.0 and -0.0 (equal, one tie group)
    base = torch.linspace(-3, 3, V, dtype=torch.float32)
    logits = torch.stack([base, base, base])
    logits[0, 40:60] = 1.0
    logits[0, 45:50] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    logits[0, 50:55] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    logits[1, 30:40] = 0.0
    logits[1, 40:50] = -0.0
    logits[2, 10:90] = 0.5
    y = torch.tensor([3, 4, 5])
    for k in (48, 52, 56, 60, 75):
        stats_match_torch_backend(logits, y, k)
        logits_case(logits.double(), y, topk=k, grouped=True)


@TRITON_SKIP
def test_logits_neg_inf_and_ignored_rows():
    logits, y = make_logits(6)
    logits[1, 20:90] = float("-inf")  # 31 finite logits: k = 64 and k = V reach into the -inf ones
    logits[3, :] = float("-inf")  # all -inf, ignored: zeros, no NaN
    y[1] = 5
    y[3] = -100
    y[4] = -100
    rows = [0, 1, 2, 4, 5]
    for kw in (dict(topk=64), dict(topk=V), dict(clamp_p=0.33), dict(topk=10)):
        got = logits_case(logits, y, rows=rows, **kw)
        assert got.clamped_entropy[3] == 0 and got.clamped_entropy[4] == 0
    stats_match_torch_backend(logits[[0, 1, 2, 4, 5]].float(), y[[0, 1, 2, 4, 5]], 64)


@TRITON_SKIP
@pytest.mark.parametrize("split", [1, 2])
def test_logits_bf16_and_splits(split):
    logits, y = make_logits(5)
    with C.override(split=split):
        logits_case(logits, y, dtype=torch.bfloat16, clamp_p=0.3, temperature=1.2, atol=1e-4)


@TRITON_SKIP
def test_logits_fp64():
    logits, y = make_logits(5, ties=True)
    logits_case(logits, y, dtype=F64, topk=40, grouped=True, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# fused linear head
# ---------------------------------------------------------------------------------------------


def make_linear(n, h, v, *, seed=0, dup=True):
    x, w, b, y = linear_inputs(n, h, v, seed=seed, scale=2.0)
    if dup:
        # duplicated (weight row, bias) give exactly tied logits in every row (columns 9..12 and 39..46)
        tie_columns(w, b, (9, 13), (39, 47))
    return x, w, b, y


def linear_case(x, w, b, y, *, dtype=torch.float32, which="all", atol=2e-5, **kw):
    x, w, b, y = (t.to(DEVICE) for t in (x, w, b, y))
    up = upstream(len(y), which)
    kw = dict(kw, entropy=True)
    leaves_gold = [t.to(dtype).double().requires_grad_() for t in (x, w, b)]
    gold = R.linear_logprobs(leaves_gold[0], leaves_gold[1], y, bias=leaves_gold[2], **kw)
    g_gold = torch.autograd.grad(_loss(gold, up), leaves_gold)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    with small():
        got = fe.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], backend="triton", **kw)
        g_got = torch.autograd.grad(_loss(got, up), leaves)
    for name, a, e in (("logprobs", got.logprobs, gold.logprobs), ("entropy", got.entropy, gold.entropy),
                       ("clamped", got.clamped_entropy, gold.clamped_entropy)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    gx, gw, gb = (g.double() for g in g_got)
    # tied columns share (W row, bias): compare their gradients per tie group of columns
    col_key = torch.cat([leaves_gold[1].detach(), leaves_gold[2].detach()[:, None]], 1)
    _, groups = torch.unique(col_key, dim=0, return_inverse=True)
    gsum = lambda g: torch.zeros(int(groups.max()) + 1, *g.shape[1:], dtype=g.dtype, device=g.device).index_add_(0, groups, g)
    ga = [_grad_atol(dtype, atol, g) for g in g_gold]
    torch.testing.assert_close(gx, g_gold[0], atol=ga[0], rtol=atol, msg=lambda m: f"grad hidden: {m}")
    torch.testing.assert_close(gsum(gw), gsum(g_gold[1]), atol=ga[1], rtol=atol, msg=lambda m: f"grad weight: {m}")
    torch.testing.assert_close(gsum(gb), gsum(g_gold[2]), atol=ga[2], rtol=atol, msg=lambda m: f"grad bias: {m}")
    return got


@TRITON_SKIP
@pytest.mark.parametrize("kcase", ["k1", "k2", "k64", "kV-1", "kV", "p0.33"])
def test_linear_every_k(kcase):
    x, w, b, y = make_linear(19, 31, V)
    y[4] = -100
    linear_case(x, w, b, y, softcap=4.0, temperature=0.8, which="clamped" if kcase == "k64" else "all", **K_CASES[kcase])


@TRITON_SKIP
def test_linear_neg_inf_bias_and_ignored():
    x, w, b, y = make_linear(9, 16, V, dup=False)
    b[50:] = float("-inf")  # V - 50 = 51 logits are -inf: k = 64 and k = V include some
    y[y >= 50] = 1
    y[0] = -100
    for k in (64, V):
        got = linear_case(x, w, b, y, topk=k)
        assert got.clamped_entropy[0] == 0


@TRITON_SKIP
def test_linear_bf16():
    x, w, b, y = make_linear(17, 32, V)
    linear_case(x, w, b, y, dtype=torch.bfloat16, clamp_p=0.2, atol=1e-4)


@TRITON_SKIP
def test_linear_tie_group_straddles_the_boundary():
    # k lands in the middle of the 8 tied columns 39..46 of row 0: tie_frac is fractional there
    from fused_entropy.backends import triton as triton_backend

    x, w, b, y = make_linear(6, 24, V)
    z0 = x[0] @ w.T + b
    k = int((z0 > z0[39]).sum()) + 3
    with small():
        stats = triton_backend.linear_forward(x.float().to(DEVICE), w.float().to(DEVICE), b.float().to(DEVICE),
                                              y.to(DEVICE), LogitTransform(), -100, True, k)
    assert stats.tie_frac[0].item() == pytest.approx(3 / 8)
    assert stats.tau[0].item() == pytest.approx(z0[39].item(), rel=1e-5)
    linear_case(x, w, b, y, topk=k)


# ---------------------------------------------------------------------------------------------
# the vocabulary-parallel select (one rank here; tests/test_distributed.py runs it on 2 ranks)
# ---------------------------------------------------------------------------------------------


@TRITON_SKIP
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_linear_topk_select_one_rank_equals_fused_forward(dtype):
    """With a one-rank all_reduce, the select's (tau, tie_frac) are bitwise the fused forward's and
    its sums, shifted by lse, give the same clamped lse and entropy; it counts the first digit
    itself (the padded columns of the last tile taken out) and sums once per digit plus once."""
    from fused_entropy.backends import triton as triton_backend

    x, w, b, y = make_linear(7, 24, 45)
    x[3] = 0.0  # logits = bias: a 4-way and a 6-way tie (columns 9..12 and 39..44)
    b[20:30] = float("-inf")
    x, w, b, y = (t.to(DEVICE) for t in (x.to(dtype), w.to(dtype), b.to(dtype), y))
    tf = LogitTransform(temperature=0.9)
    calls = []

    def all_reduce(t):
        calls.append((t.dtype, tuple(t.shape)))
        return t

    z3 = b[:45].double() / 0.9  # row 3's logits
    k_tie = int((z3 > z3[39]).sum()) + 2  # 2 of the tied columns 39..44 are in S
    straddles = False
    for k in (1, k_tie, 35, 45):
        calls.clear()
        with small(split=2):
            want = triton_backend.linear_forward(x, w, b, y, tf, -100, True, k)
            shift = torch.where(torch.isfinite(want.lse), want.lse, torch.zeros_like(want.lse))
            tau, frac, s_s, t_s = triton_backend.linear_topk_select(x, w, b, tf, k, shift, all_reduce)
        assert torch.equal(tau, want.tau) and torch.equal(frac, want.tie_frac), k
        tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(shift + torch.log(s_s), want.lse_clamped, **tol)
        torch.testing.assert_close(torch.log(s_s) - t_s / s_s, want.clamped_entropy, **tol)
        digits = C.RADIX_DIGITS[64 if dtype == F64 else 32]
        assert calls == [(torch.int32, (7, C.RADIX_NBINS))] * len(digits) + [(dtype, (2, 1, 7))]
        straddles |= k == k_tie and frac[3].item() == pytest.approx(2 / 6)
    assert straddles
