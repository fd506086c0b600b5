"""logprobs_from_logits on both backends against the fp64 reference: forward and grad_logits.

torch: fp64 to 1e-10, -inf logits included, over several chunks (small chunk bounds).

Triton: runs on CUDA, or on CPU with TRITON_INTERPRET=1. Small blocks (4 rows x 16 columns) are
forced so that several row blocks, vocabulary tiles and splits are exercised; one test runs the
defaults.
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy.backends import torch_chunked
from fused_entropy.kernels import configs as C

from _inputs import grads_of, leaves, logits_inputs as make
from conftest import DEVICE, TRITON_SKIP

F64 = torch.float64
WHICH = {"logp": (1, 0), "ent": (0, 1), "both": (1, 1)}


@pytest.mark.parametrize("which", list(WHICH), ids=list(WHICH))
def test_logits_with_neg_inf(which):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 33, generator=g, dtype=F64) * 3
    logits[:, 5:9] = -math.inf
    logits[2, :-1] = -math.inf  # a single finite logit: p = 1 there, entropy 0
    y = torch.randint(9, 33, (7,), generator=g)
    y[2] = 32
    up = [torch.randn(7, generator=g, dtype=F64) * s for s in WHICH[which]]
    la = logits.clone().requires_grad_(True)
    lr = logits.clone().requires_grad_(True)
    out = fe.logprobs_from_logits(la, y, temperature=0.9, backend="torch")
    ref = R.logprobs_from_logits(lr, y, temperature=0.9)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-10)
    (ga,) = grads_of(out[:2], up, (la,))
    (gr,) = grads_of(ref[:2], up, (lr,))
    assert torch.isfinite(ga).all()
    torch.testing.assert_close(ga, gr, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(1, 5), (13, 77), (4, 1)], ids=["n1", "odd", "v1"])
@pytest.mark.parametrize("temperature", [1.0, 0.6], ids=["t1", "t06"])
def test_logits_entry_matches_reference(shape, temperature, monkeypatch):
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 200)
    monkeypatch.setattr(torch_chunked, "MIN_CHUNK_ROWS", 1)
    n, v = shape
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, v, generator=g, dtype=F64) * 4
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = -100
    up = [torch.randn(n, generator=g, dtype=F64) for _ in range(2)]
    la, lr = leaves(logits, logits)
    out = fe.logprobs_from_logits(la, y, temperature=temperature, backend="torch")
    ref = R.logprobs_from_logits(lr, y, temperature=temperature)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-10)
    (ga,) = grads_of(out[:2], up, (la,))
    (gr,) = grads_of(ref[:2], up, (lr,))
    torch.testing.assert_close(ga, gr, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Triton backend (moved from test_triton_logits.py)
# ---------------------------------------------------------------------------------------------


def small(split=2):
    return C.override(logits_stats=C.Config(4, 16), logits_grad=C.Config(4, 32), logits_radix=C.Config(4, 16), split=split)


def upstream(shape, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64) if s else None for s in WHICH[which]]


def run(fn, logits, y, up, dtype, **kw):
    leaf = logits.detach().clone().to(dtype).requires_grad_(True)
    out = fn(leaf, y, **kw)
    loss = sum((o.double() * u).sum() for o, u in zip((out.logprobs, out.entropy), up) if u is not None)
    (g,) = torch.autograd.grad(loss, [leaf])
    return out, g.double()


def compare(logits, y, up, *, dtype=torch.float32, atol=2e-5, rtol=2e-5, rows=None, **kw):
    logits, y = logits.to(DEVICE), y.to(DEVICE)
    up = [None if u is None else u.to(DEVICE) for u in up]
    gold, g_gold = run(R.logprobs_from_logits, logits, y, up, F64, **kw)
    got, g_got = run(fe.logprobs_from_logits, logits, y, up, dtype, backend="triton", **kw)
    sel = slice(None) if rows is None else rows
    for name, a, e in (("logprobs", got.logprobs, gold.logprobs), ("entropy", got.entropy, gold.entropy),
                       ("grad logits", g_got, g_gold)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double()[sel], e[sel], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return got, g_got


@TRITON_SKIP
@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
@pytest.mark.parametrize("shape", [(13, 101), (1, 53), (6, 1)], ids=["odd", "n1", "v1"])
def test_fp32(shape, temperature, which):
    n, v = shape
    logits, y = make(n, v)
    y[::3] = -100
    with small():
        compare(logits, y, upstream(n, which), temperature=temperature)


@TRITON_SKIP
@pytest.mark.parametrize("split", [1, 4])
def test_splits_and_3d(split):
    logits, y = make(12, 70)
    logits, y = logits.reshape(3, 4, 70), y.reshape(3, 4)
    y[1, 2] = -100
    with small(split):
        compare(logits, y, upstream((3, 4), "both"), temperature=1.4)


@TRITON_SKIP
def test_default_config_and_ignore_index_in_range():
    logits, y = make(21, 700)
    y[4] = 7
    got, g = compare(logits, y, upstream(21, "both"), ignore_index=7)
    assert got.logprobs[4] == 0 and (g[4] == 0).all()


@TRITON_SKIP
def test_fp64():
    logits, y = make(9, 77)
    with small():
        compare(logits, y, upstream(9, "both"), dtype=F64, atol=1e-12, rtol=1e-12, temperature=0.6)


@TRITON_SKIP
def test_very_negative_neg_inf_and_ignored_rows():
    logits, y = make(10, 60)
    logits[1] -= 250.0  # all logits of the row below -100
    logits[3, 10:40] = float("-inf")  # some -inf logits
    y[3] = 5
    logits[4] = float("-inf")  # a row of -inf only, ignored: outputs 0 and zero gradient, no NaN
    y[4] = -100
    y[7] = -100
    rows = [0, 1, 2, 3, 5, 6, 7, 8, 9]  # the reference itself is NaN on the all -inf row
    with small():
        got, g = compare(logits, y, upstream(10, "both"), atol=1e-4, rtol=2e-5, rows=rows)
    assert got.logprobs[4] == 0 and got.entropy[4] == 0 and (g[4] == 0).all() and (g[7] == 0).all()
    assert (g[3, 10:40] == 0).all()


@TRITON_SKIP
def test_all_rows_ignored_and_empty():
    logits, y = make(5, 40)
    y[:] = -100
    with small():
        got, g = compare(logits, y, upstream(5, "both"))
    assert (got.logprobs == 0).all() and (g == 0).all()
    z = torch.zeros(0, 40, device=DEVICE, requires_grad=True)
    out = fe.logprobs_from_logits(z, torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton")
    assert out.logprobs.shape == (0,)
    out.entropy.sum().backward()
    assert z.grad.shape == (0, 40)


@TRITON_SKIP
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_torch(dtype):
    logits, y = make(17, 90)
    y[::4] = -100
    logits = logits.to(dtype).double().to(DEVICE)  # gold and contenders see the same rounded logits
    y = y.to(DEVICE)
    up = [u.to(DEVICE) for u in upstream(17, "both")]
    gold, g_gold = run(R.logprobs_from_logits, logits, y, up, F64, temperature=0.8)
    plain, g_plain = run(R.logprobs_from_logits, logits, y, up, dtype, temperature=0.8)
    with small():
        got, g_got = run(fe.logprobs_from_logits, logits, y, up, dtype, backend="triton", temperature=0.8)
    assert g_got.dtype == F64 and torch.isfinite(g_got).all()
    err = lambda o, g: [(o.logprobs.double() - gold.logprobs).abs().max().item(),
                        (o.entropy.double() - gold.entropy).abs().max().item(),
                        (g - g_gold).abs().max().item()]
    ours, theirs = err(got, g_got), err(plain, g_plain)
    # the gradient is returned in the logits' dtype by both: one ulp of its scale as margin
    margins = [1e-5, 1e-5, torch.finfo(dtype).eps * g_gold.abs().max().item()]
    for name, a, b, m in zip(("logp", "ent", "grad"), ours, theirs, margins):
        assert a <= b + m, f"{name}: triton {a:.3g} vs torch {b:.3g} (+{m:.2g})"
