"""linear_logprobs on the Triton backend against the fp64 reference: forward and every gradient.

Runs on CUDA, or on CPU with TRITON_INTERPRET=1 (how CI runs it). Tiny blocks (16) are forced so
that several row blocks, vocabulary tiles, vocabulary splits and a ragged last H slice are
exercised on small shapes; one test runs the shipped default configuration.
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy.kernels import configs as C

from conftest import DEVICE, TRITON_SKIP

pytestmark = TRITON_SKIP
F64 = torch.float64
TINY = C.Config(16, 16, 16)


def tiny(split=2):
    return C.override(linear_stats=TINY, linear_grad=TINY, linear_radix=TINY, split=split)


def make(n, h, v, *, seed=0, bias=True, scale=2.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * scale
    w = torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)
    b = torch.randn(v, generator=g, dtype=F64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if lead is not None:
        x, y = x.reshape(*lead, h), y.reshape(lead)
    return x, w, b, y


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


CASES = {
    "plain": dict(),
    "temp": dict(temperature=0.7),
    "softcap": dict(softcap=2.5, temperature=1.3),
    "scale": dict(logit_scale=0.6),
    "all": dict(softcap=4.0, temperature=0.8, logit_scale=1.7),
}
WHICH = {"logp": (1, 0), "ent": (0, 1), "both": (1, 1)}


def upstream(n, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64) if s else None for s in WHICH[which]]


@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_odd_shape(case, which, bias):
    # N=37 (3 row blocks, ragged), H=31 (ragged H slice), V=101 (7 tiles, split in 2 runs of 4 and 3)
    x, w, b, y = make(37, 31, 101, bias=bias)
    y[::4] = -100
    with tiny():
        compare(x, w, b, y, upstream(37, which), **CASES[case])


@pytest.mark.parametrize("split", [1, 3, 7])
def test_vocab_splits(split):
    x, w, b, y = make(20, 16, 100)
    with tiny(split):
        compare(x, w, b, y, upstream(20, "both"), softcap=3.0, temperature=0.9)


@pytest.mark.parametrize("shape", [(1, 16, 53), (5, 31, 17), (3, 8, 1)], ids=["n1", "v17", "v1"])
def test_small_shapes(shape):
    n, h, v = shape
    x, w, b, y = make(n, h, v)
    with tiny():
        compare(x, w, b, y, upstream(n, "both"), temperature=1.3)


def test_3d_hidden_and_other_ignore_index():
    # ignore_index inside [0, V): rows whose target is 3 are ignored, other rows that are 3 do not exist
    x, w, b, y = make(12, 24, 40, lead=(3, 4))
    y[0, 1] = 3
    y[2, 2] = 3
    with tiny():
        compare(x, w, b, y, [u.reshape(3, 4) for u in upstream(12, "both")], ignore_index=3)
    out = fe.linear_logprobs(x.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE), bias=b.float().to(DEVICE),
                             ignore_index=3, backend="triton")
    assert out.logprobs.shape == (3, 4) and out.logprobs[0, 1] == 0 and out.entropy[2, 2] == 0


def test_default_config():
    # the shipped block sizes (128 x 128 x 32 for fp32), no override
    x, w, b, y = make(9, 40, 150)
    compare(x, w, b, y, upstream(9, "both"), softcap=5.0)


def test_fp64():
    x, w, b, y = make(19, 31, 70)
    with tiny():
        compare(x, w, b, y, upstream(19, "both"), dtype=F64, atol=1e-12, rtol=1e-12, softcap=3.0, temperature=0.7)


def test_all_rows_ignored():
    x, w, b, y = make(10, 16, 33)
    y[:] = -100
    with tiny():
        out = fe.linear_logprobs(*(t.float().to(DEVICE).requires_grad_() for t in (x, w)), y.to(DEVICE), backend="triton")
        assert (out.logprobs == 0).all() and (out.entropy == 0).all()
        compare(x, w, b, y, upstream(10, "both"))


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["plain", "all"])
def test_low_precision_no_worse_than_torch(dtype, case):
    x, w, b, y = make(33, 48, 90)
    y[::5] = -100
    with tiny():
        ours, plain, scale = _errors(dtype, x, w, b, y, upstream(33, "both"), CASES[case])
    # outputs: fp32 math on 16-bit inputs beats torch's 16-bit logits; gradients come back in the
    # input dtype, so both round to it: allow one 16-bit ulp of the gradient's scale as margin
    eps = torch.finfo(dtype).eps
    margins = [1e-5, 1e-5] + [eps * s for s in scale]
    for name, e_ours, e_torch, m in zip(("logp", "ent", "dx", "dw", "db"), ours, plain, margins):
        assert e_ours <= e_torch + m, f"{name}: triton {e_ours:.3g} vs torch {e_torch:.3g} (+{m:.2g})"
