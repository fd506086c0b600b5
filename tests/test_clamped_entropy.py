"""Top-k clamped entropy (MATH.md section 3) on the torch backend against the fp64 reference."""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy.backends import torch_chunked

F64 = torch.float64
V = 67


def data(n=11, h=12, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * 2
    w = torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)
    b = torch.randn(v, generator=g, dtype=F64)
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = -100
    return x, w, b, y


def ks():
    return {"k1": dict(topk=1), "k2": dict(topk=2), "k64": dict(topk=64), "kV-1": dict(topk=V - 1), "kV": dict(topk=V),
            "p0": dict(clamp_p=0.0), "p02": dict(clamp_p=0.2), "p033": dict(clamp_p=0.33), "p0999": dict(clamp_p=0.999)}


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
