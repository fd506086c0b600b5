"""The SHIPPED tile configurations (``kernels/configs.py`` defaults, no overrides) against fp64.

Every other Triton test forces tiny 16x16x16 tiles so that small shapes cross many tiles; these run
the production tiles (bf16/fp16 128x64x32, fp32 64x32x16, fp64 32x32x16) at shapes just over one
tile in every dimension (ragged N, H and V), so the arithmetic the GPU runs is checked on every
commit: log-prob, entropy, clamped entropy (top-k and clamp_p, ties at the boundary) and the
gradients of hidden, weight and bias. Interpreter on CPU, compiled kernels with
``FUSED_ENTROPY_TEST_DEVICE=cuda``.

Low-precision criterion (as in CCE's tests): the kernel's error against the fp64 result on the same
rounded inputs is at most twice plain torch's error at that precision plus a small floor.
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
FLOOR = {"bf16": 2e-3, "fp16": 3e-4, "fp32": 2e-6, "fp64": 1e-12}


def just_over_one_tile(key: str):
    """(N, H, V): one row more than a row block, H a block and a half, V two tiles and three columns."""
    c = C.get("linear_stats", key)
    return c.block_n + 2, c.block_h + c.block_h // 2 + 1, 2 * c.block_v + 3


def make(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * 1.5
    w = torch.randn(v, h, generator=g, dtype=F64) * (2.0 / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=F64) * 0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    up = [torch.randn(n, generator=g, dtype=F64).to(DEVICE) for _ in range(3)]
    return *(t.to(dtype).to(DEVICE) for t in (x, w, b)), y.to(DEVICE), up


def outputs_and_grads(fn, x, w, b, y, up, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], y, bias=leaves[2], **kw)
    outs = [out.logprobs, out.entropy, out.clamped_entropy]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, up) if o is not None)
    return [None if o is None else o.detach().double() for o in outs], [g.double() for g in torch.autograd.grad(loss, leaves)]


def rel(a, b):
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(key, x, w, b, y, up, **kw):
    dtype = DTYPES[key]
    got = outputs_and_grads(fe.linear_logprobs, x, w, b, y, up, dtype, backend="triton", **kw)
    gold = outputs_and_grads(R.linear_logprobs, x, w, b, y, up, F64, **kw)
    plain = outputs_and_grads(R.linear_logprobs, x, w, b, y, up, dtype, **kw)
    valid = y != -100
    names = ["logprobs", "entropy", "clamped_entropy", "grad hidden", "grad weight", "grad bias"]
    for i, name in enumerate(names):
        a, e, t = (got[0] + got[1])[i], (gold[0] + gold[1])[i], (plain[0] + plain[1])[i]
        if e is None:
            assert a is None, name
            continue
        if i < 3:
            a, e, t = a[valid], e[valid], t[valid]
        err, torch_err = rel(a, e), rel(t, e)
        assert err <= 2 * torch_err + FLOOR[key], f"{key} {name}: error {err:.3e} vs plain torch {torch_err:.3e}"


OPTIONS = {
    "plain": dict(),
    "softcap-temp": dict(softcap=30.0, temperature=0.7),
    "topk": dict(topk=5, temperature=0.9),
    "clamp_p": dict(entropy=False, clamp_p=0.3),
}


@pytest.mark.parametrize("opt", list(OPTIONS))
@pytest.mark.parametrize("key", list(DTYPES))
def test_shipped_tile_against_fp64(key, opt):
    n, h, v = just_over_one_tile(key)
    x, w, b, y, up = make(n, h, v, DTYPES[key])
    kw = OPTIONS[opt]
    if "topk" not in kw and "clamp_p" not in kw:
        up[2] = None
    if kw.get("entropy") is False:
        up[1] = None
    check(key, x, w, b, y, up, **kw)


@pytest.mark.parametrize("key", ["bf16", "fp32"])
def test_shipped_tile_topk_boundary_inside_tie_group(key):
    """Ten identical W rows hold every row's largest logit; topk=4 puts the boundary inside the
    group, so each tied logit carries weight 4/10. Inputs are small dyadic numbers, so every dot
    product is exact in any summation order: the ties are exact in the kernel and the fp64 gold alike."""
    n, h, v = just_over_one_tile(key)
    g = torch.Generator().manual_seed(3)
    dyadic = lambda t, q: torch.round(t * q) / q
    u = (torch.randint(0, 2, (h,), generator=g) * 2 - 1).to(F64) / 8
    w = dyadic(torch.randn(v, h, generator=g, dtype=F64) * 0.05, 64)
    bv = C.get("linear_stats", key).block_v
    # across vocabulary tiles: both ends of the first tile boundary, the middle of the second tile, the padded last one
    tied = torch.tensor([0, 5, 17, bv - 1, bv, bv + 1, bv + bv // 2, v - 3, v - 2, v - 1])
    w[tied] = u
    x = dyadic(u * 4 + torch.randn(n, h, generator=g, dtype=F64) * 0.02, 64)
    y = torch.randint(0, v, (n,), generator=g)
    y[: len(tied)] = tied  # some targets inside the tie group
    up = [torch.randn(n, generator=g, dtype=F64).to(DEVICE) for _ in range(3)]
    dt = DTYPES[key]
    x, w, y = x.to(dt).to(DEVICE), w.to(dt).to(DEVICE), y.to(DEVICE)
    b = torch.zeros(v, dtype=dt, device=DEVICE)
    z = (x.double() @ w.double().T)
    others = torch.ones(v, dtype=torch.bool)
    others[tied] = False
    assert (z[:, tied] == z[:, tied[:1]]).all() and (z[:, tied[0]] > z[:, others.to(z.device)].max(1).values).all()
    check(key, x, w, b, y, up, topk=4)
