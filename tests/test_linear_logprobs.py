"""linear_logprobs on both backends against the fp64 reference: forward and every gradient.

torch: fp64 to 1e-10 over several chunks (small chunk bounds force a ragged last one), plus how the
backward skips work for outputs and inputs without a gradient.

Triton: runs on CUDA, or on CPU with TRITON_INTERPRET=1 (how CI runs it). Tiny blocks (16) are
forced so that several row blocks, vocabulary tiles, vocabulary splits and a ragged last H slice are
exercised on small shapes; one test runs the shipped default configuration.
"""
import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy.backends import torch_chunked
from fused_entropy.kernels import configs as C

from _inputs import grads_of, leaves, linear_inputs as make
from conftest import DEVICE, TRITON_SKIP

F64 = torch.float64


CASES = {
    "plain": dict(),
    "temp": dict(temperature=0.7),
    "softcap": dict(softcap=2.5, temperature=1.3),
    "scale": dict(logit_scale=0.6),
    "all": dict(softcap=4.0, temperature=0.8, logit_scale=1.7),
}
SHAPES = {"odd": (37, 31, 101), "n1": (1, 16, 53), "vsmall": (9, 8, 3)}
WHICH = {"logp": (1, 0), "ent": (0, 1), "both": (1, 1)}


@pytest.mark.parametrize("which", list(WHICH), ids=list(WHICH))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_fp64_matches_reference(shape, case, which, bias, monkeypatch):
    # small chunks so several chunks (and a ragged last one) are exercised
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 700)
    monkeypatch.setattr(torch_chunked, "MIN_CHUNK_ROWS", 1)
    n, h, v = SHAPES[shape]
    x, w, b, y = make(n, h, v, bias=bias, scale=2.0)
    y[::4] = -100
    kw = CASES[case]
    gsel = WHICH[which]
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(n, generator=g, dtype=F64) * s for s in gsel]

    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch", entropy=True, **kw)
    xr, wr, br = leaves(x, w, b)
    ref = R.linear_logprobs(xr, wr, y, bias=br, entropy=True, **kw)
    assert out.logprobs.dtype == F64 and out.logprobs.shape == y.shape
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-10)
    ga = grads_of(out[:2], up, (xa, wa, ba))
    gr = grads_of(ref[:2], up, (xr, wr, br))
    for a, r in zip(ga, gr):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_linear_3d_hidden_and_ignored_rows_have_zero_grad():
    x, w, b, y = make(12, 16, 40, lead=(3, 4))
    y[1, :] = -100
    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch")
    ref = R.linear_logprobs(x, w, y, bias=b)
    assert out.logprobs.shape == (3, 4) and out.entropy.shape == (3, 4)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-10)
    assert torch.all(out.logprobs[1] == 0) and torch.all(out.entropy[1] == 0)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert torch.all(xa.grad[1] == 0) and torch.any(xa.grad[0] != 0)


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    x, w, b, y = make(6, 8, 20)
    y[:] = -100
    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch")
    assert torch.all(out.logprobs == 0) and torch.all(out.entropy == 0)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    for t in (xa, wa, ba):
        assert torch.all(t.grad == 0) and not torch.isnan(t.grad).any()


def test_entropy_off_returns_none_and_logprobs_match():
    x, w, b, y = make(10, 8, 30)
    out = fe.linear_logprobs(x, w, y, bias=b, entropy=False, backend="torch")
    assert out.entropy is None and out.clamped_entropy is None
    torch.testing.assert_close(out.logprobs, R.linear_logprobs(x, w, y, bias=b).logprobs, rtol=1e-10, atol=1e-10)


def test_n_zero_returns_empty():
    x, w, b, y = make(0, 8, 30)
    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch", topk=3)
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,) and out.clamped_entropy.shape == (0,)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert torch.all(wa.grad == 0)


def test_very_negative_rows_no_nan():
    """Every logit below -100 (a running max started at 0 would underflow: verl PR #7439)."""
    x, w, _, y = make(5, 4, 50, bias=False)
    b = torch.full((50,), -300.0, dtype=F64)
    b[::7] = -250.0
    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, backend="torch")
    ref = R.linear_logprobs(x, w, y, bias=b)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-10, atol=1e-9)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (xa, wa, ba))


def _err(a, gold):
    return (a.double() - gold).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(dtype):
    """Error vs fp64 gold is no worse than the reference evaluated at the same precision."""
    x, w, b, y = make(64, 48, 300, dtype=dtype, scale=3.0)
    y[::5] = -100
    g = torch.Generator().manual_seed(2)
    up = [torch.randn(64, generator=g, dtype=F64) for _ in range(2)]
    x64, w64, b64 = leaves(x.double(), w.double(), b.double())
    gold = R.linear_logprobs(x64, w64, y, bias=b64, softcap=5.0)
    gold_g = grads_of(gold[:2], up, (x64, w64, b64))
    xl, wl, bl = leaves(x, w, b)
    plain = R.linear_logprobs(xl, wl, y, bias=bl, softcap=5.0)
    plain_g = grads_of(plain[:2], [u.float() for u in up], (xl, wl, bl))
    xa, wa, ba = leaves(x, w, b)
    out = fe.linear_logprobs(xa, wa, y, bias=ba, softcap=5.0, backend="torch")
    assert out.logprobs.dtype == torch.float32
    out_g = grads_of(out[:2], [u.float() for u in up], (xa, wa, ba))
    assert xa.grad is None and out_g[0].dtype == dtype and out_g[1].dtype == dtype
    for a, p, gd in zip(out[:2], plain[:2], gold[:2]):
        assert _err(a, gd) <= _err(p, gd) * 1.1 + 1e-6
    for a, p, gd in zip(out_g, plain_g, gold_g):
        assert _err(a, gd) <= _err(p, gd) * 1.1 + 1e-6


def test_grad_only_on_entropy_skips_logprob_work(monkeypatch):
    """A gradient on one output reaches the backend as None for the other."""
    seen = {}
    real = torch_chunked.linear_backward

    def spy(*args, **kwargs):
        seen["g_lp"], seen["g_ent"] = args[7], args[8]
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_chunked, "linear_backward", spy)
    x, w, b, y = make(8, 8, 20)
    xa = x.clone().requires_grad_(True)
    out = fe.linear_logprobs(xa, w, y, bias=b, backend="torch")
    out.entropy.sum().backward()
    assert seen["g_lp"] is None and seen["g_ent"] is not None


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_input_gets_no_gradient_work(frozen, monkeypatch):
    """needs_input_grad reaches the backend: a frozen weight costs no dW product, and vice versa."""
    seen = {}
    real = torch_chunked.linear_backward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["needs"], seen["out"] = kwargs["needs"], out
        return out

    monkeypatch.setattr(torch_chunked, "linear_backward", spy)
    x, w, b, y = make(8, 8, 20)
    xa, wa = leaves(x, w)
    (wa if frozen == "weight" else xa).requires_grad_(False)
    out = fe.linear_logprobs(xa, wa, y, backend="torch")
    out.logprobs.sum().backward()
    live, gold = (xa, x) if frozen == "weight" else (wa, w)
    gold = gold.clone().requires_grad_(True)
    R.linear_logprobs(*((gold, w) if frozen == "weight" else (x, gold)), y).logprobs.sum().backward()
    assert seen["needs"] == (frozen != "hidden", frozen != "weight", False)
    assert (seen["out"][1] is None) == (frozen == "weight") and (seen["out"][0] is None) == (frozen == "hidden")
    torch.testing.assert_close(live.grad, gold.grad, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Triton backend (moved from test_triton_linear.py)
# ---------------------------------------------------------------------------------------------

TINY = C.Config(16, 16, 16)


def tiny(split=2):
    return C.override(linear_stats=TINY, linear_grad=TINY, linear_radix=TINY, split=split)


def run(fn, x, w, b, y, up, dtype, **kw):
    """Outputs and gradients (x, w, b) of sum(up_lp * logp + up_ent * H) through ``fn``."""
    leaves = [None if t is None else t.detach().clone().to(dtype).requires_grad_(True) for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    loss = sum((o.double() * u).sum() for o, u in zip((out.logprobs, out.entropy), up) if u is not None)
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, want) if loss.requires_grad else [torch.zeros_like(t) for t in want]
    return out, [g.double() for g in grads]


def compare(x, w, b, y, up, *, dtype=torch.float32, atol=2e-5, rtol=2e-5, **kw):
    dev = lambda t: None if t is None else t.to(DEVICE)
    x, w, b, y = dev(x), dev(w), dev(b), dev(y)
    up = [None if u is None else u.to(DEVICE) for u in up]
    gold, g_gold = run(R.linear_logprobs, x, w, b, y, up, F64, **kw)
    got, g_got = run(fe.linear_logprobs, x, w, b, y, up, dtype, backend="triton", **kw)
    assert got.logprobs.dtype == (F64 if dtype == F64 else torch.float32)
    for name, a, e in (("logprobs", got.logprobs, gold.logprobs), ("entropy", got.entropy, gold.entropy)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for name, a, e in zip(("grad hidden", "grad weight", "grad bias"), g_got, g_gold):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def upstream(n, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64) if s else None for s in WHICH[which]]


@TRITON_SKIP
@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_odd_shape(case, which, bias):
    # N=37 (3 row blocks, ragged), H=31 (ragged H slice), V=101 (7 tiles, split in 2 runs of 4 and 3)
    x, w, b, y = make(37, 31, 101, bias=bias, scale=2.0)
    y[::4] = -100
    with tiny():
        compare(x, w, b, y, upstream(37, which), **CASES[case])


@TRITON_SKIP
@pytest.mark.parametrize("split", [1, 3, 7])
def test_vocab_splits(split):
    x, w, b, y = make(20, 16, 100, scale=2.0)
    with tiny(split):
        compare(x, w, b, y, upstream(20, "both"), softcap=3.0, temperature=0.9)


@TRITON_SKIP
@pytest.mark.parametrize("shape", [(1, 16, 53), (5, 31, 17), (3, 8, 1)], ids=["n1", "v17", "v1"])
def test_small_shapes(shape):
    n, h, v = shape
    x, w, b, y = make(n, h, v, scale=2.0)
    with tiny():
        compare(x, w, b, y, upstream(n, "both"), temperature=1.3)


@TRITON_SKIP
def test_3d_hidden_and_other_ignore_index():
    # ignore_index inside [0, V): rows whose target is 3 are ignored, other rows that are 3 do not exist
    x, w, b, y = make(12, 24, 40, lead=(3, 4), scale=2.0)
    y[0, 1] = 3
    y[2, 2] = 3
    with tiny():
        compare(x, w, b, y, [u.reshape(3, 4) for u in upstream(12, "both")], ignore_index=3)
    out = fe.linear_logprobs(x.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE), bias=b.float().to(DEVICE),
                             ignore_index=3, backend="triton")
    assert out.logprobs.shape == (3, 4) and out.logprobs[0, 1] == 0 and out.entropy[2, 2] == 0


@TRITON_SKIP
def test_default_config():
    # the shipped block sizes (128 x 128 x 32 for fp32), no override
    x, w, b, y = make(9, 40, 150, scale=2.0)
    compare(x, w, b, y, upstream(9, "both"), softcap=5.0)


@TRITON_SKIP
def test_fp64():
    x, w, b, y = make(19, 31, 70, scale=2.0)
    with tiny():
        compare(x, w, b, y, upstream(19, "both"), dtype=F64, atol=1e-12, rtol=1e-12, softcap=3.0, temperature=0.7)


@TRITON_SKIP
def test_all_rows_ignored():
    x, w, b, y = make(10, 16, 33, scale=2.0)
    y[:] = -100
    with tiny():
        out = fe.linear_logprobs(*(t.float().to(DEVICE).requires_grad_() for t in (x, w)), y.to(DEVICE), backend="triton")
        assert (out.logprobs == 0).all() and (out.entropy == 0).all()
        compare(x, w, b, y, upstream(10, "both"))


@TRITON_SKIP
def test_very_negative_and_neg_inf_logits():
    # every logit of every row below -100 (a running max initialised to 0 would underflow), and some
    # -inf logits through a -inf bias (never on a target column)
    x, w, b, y = make(21, 16, 45, scale=0.5)
    b = b - 300.0
    b[[2, 17, 30, 44]] = float("-inf")
    y[y == 2] = 0
    y[y == 17] = 0
    y[y == 30] = 0
    y[y == 44] = 0
    y[5] = -100
    with tiny():
        for kw in (dict(), dict(temperature=0.5)):
            # fp32 logits near -300/T carry an absolute rounding of ~|z| eps = 4e-5 (T = 0.5)
            compare(x, w, b, y, upstream(21, "both"), atol=3e-4, rtol=3e-4, **kw)


@TRITON_SKIP
def test_empty_rows():
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = fe.linear_logprobs(x, w, y, backend="triton")
    assert out.logprobs.shape == (0,) and out.entropy.shape == (0,)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == (0, 16) and (w.grad == 0).all()


def _errors(dtype, x, w, b, y, up, kw):
    """Max error vs the fp64 gold of (outputs, grads) for the kernel and for plain torch at ``dtype``."""
    dev = lambda t: None if t is None else t.to(DEVICE)
    x, w, b, y = (dev(t) for t in (x, w, b, y))
    up = [dev(u) for u in up]
    # the gold result sees the same rounded inputs as both contenders
    xr, wr, br = (None if t is None else t.to(dtype).double() for t in (x, w, b))
    gold, g_gold = run(R.linear_logprobs, xr, wr, br, y, up, F64, **kw)
    torch_lp, g_torch = run(R.linear_logprobs, xr, wr, br, y, up, dtype, **kw)
    got, g_got = run(fe.linear_logprobs, xr, wr, br, y, up, dtype, backend="triton", **kw)
    err = lambda outs, grads: [
        (outs.logprobs.double() - gold.logprobs).abs().max().item(),
        (outs.entropy.double() - gold.entropy).abs().max().item(),
        *[(a - e).abs().max().item() for a, e in zip(grads, g_gold)],
    ]
    return err(got, g_got), err(torch_lp, g_torch), [g.abs().max().item() for g in g_gold]


@TRITON_SKIP
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_low_precision_no_worse_than_torch(dtype, case):
    x, w, b, y = make(33, 48, 90, scale=2.0)
    y[::5] = -100
    with tiny():
        ours, plain, scale = _errors(dtype, x, w, b, y, upstream(33, "both"), CASES[case])
    # outputs: fp32 math on 16-bit inputs beats torch's 16-bit logits; gradients come back in the
    # input dtype, so both round to it: allow one 16-bit ulp of the gradient's scale as margin
    eps = torch.finfo(dtype).eps
    margins = [1e-5, 1e-5] + [eps * s for s in scale]
    for name, e_ours, e_torch, m in zip(("logp", "ent", "dx", "dw", "db"), ours, plain, margins):
        assert e_ours <= e_torch + m, f"{name}: triton {e_ours:.3g} vs torch {e_torch:.3g} (+{m:.2g})"
