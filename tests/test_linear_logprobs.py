"""linear_logprobs / logprobs_from_logits on the torch backend against the fp64 reference."""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy.backends import torch_chunked

F64 = torch.float64


def make(n, h, v, *, dtype=F64, seed=0, bias=True, scale=1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=F64) * scale).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)).to(dtype)
    b = (torch.randn(v, generator=g, dtype=F64)).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if lead is not None:
        x, y = x.reshape(*lead, h), y.reshape(lead)
    return x, w, b, y


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(outs, weights, inputs):
    loss = sum((o * wt).sum() for o, wt in zip(outs, weights) if o is not None and wt is not None)
    want = [t for t in inputs if t is not None]
    gs = torch.autograd.grad(loss, want, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, want)]


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
