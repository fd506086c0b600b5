"""The linear head's backward on the Triton backend (per vocabulary chunk, no atomics, deterministic)
against the fp64 reference, and how it is launched.

Runs on CUDA, or on CPU with TRITON_INTERPRET=1. Tiny blocks (16) and a small dz-buffer bound force
several vocabulary chunks on small shapes; one test runs the shipped bf16 tile just past one tile.
With duplicated W rows (tied logits) and top-k, the reference's torch.topk keeps arbitrary members
of a tie group while the fused backends weight every member by tie_frac, so dW and db are compared
per tie group of columns (dX sees only the group sums).
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import _launch
from fused_entropy import reference as R
from fused_entropy._types import LogitTransform
from fused_entropy.backends import triton as triton_backend
from fused_entropy.kernels import configs as C

from conftest import DEVICE, TRITON_SKIP

pytestmark = TRITON_SKIP
F64 = torch.float64
TINY = C.Config(16, 16, 16)
# fp64: the shipped 32 x 32 x 16 blocks (compiled fp64 dots reject 16 x 16 tiles; the interpreter does not care)
TINY_F64 = C.Config(32, 32, 16)


def tiny(chunk_cols=None, n=None, itemsize=4, **kw):
    """Tiny blocks; with ``chunk_cols``, a dz-buffer bound giving chunks of that many columns."""
    if chunk_cols is not None:
        kw["grad_buffer_bytes"] = n * itemsize * chunk_cols
    cfg = TINY_F64 if itemsize == 8 else TINY
    return C.override(linear_stats=cfg, linear_grad=cfg, linear_radix=cfg, split=2, **kw)


def make(n, h, v, *, seed=0, bias=True, dup=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * 2
    w = torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)
    b = torch.randn(v, generator=g, dtype=F64) if bias else None
    if dup:
        # tied logits in every row: columns 9..12, and 28..37, a group across the chunk edge at 32
        w[10:13] = w[9]
        w[29:38] = w[28]
        if b is not None:
            b[10:13] = b[9]
            b[29:38] = b[28]
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    return x, w, b, y


# upstream gradients of (logprobs, entropy, clamped entropy)
WHICH = {"logp": (1, 0, 0), "ent": (0, 1, 0), "both": (1, 1, 0), "clamped": (0, 0, 1), "all": (1, 1, 1)}


def upstream(n, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64).to(DEVICE) if s else None for s in WHICH[which]]


def grads(fn, x, w, b, y, up, dtype, frozen=(), **kw):
    """Gradients (x, w, b) of sum(up . outputs) through ``fn``; None for the frozen ones."""
    leaves = [None if t is None else t.detach().clone().to(DEVICE, dtype).requires_grad_(name not in frozen)
              for name, t in zip(("x", "w", "b"), (x, w, b))]
    out = fn(leaves[0], leaves[1], y.to(DEVICE), bias=leaves[2], entropy=True, **kw)
    parts = (out.logprobs, out.entropy, out.clamped_entropy)
    loss = sum((p.double() * u).sum() for p, u in zip(parts, up) if u is not None)
    want = [t for t in leaves if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, want))
    return [next(got).double() if t is not None and t.requires_grad else None for t in leaves]


def tie_groups(w, b):
    key = torch.cat([w, b[:, None]], 1) if b is not None else w
    _, groups = torch.unique(key.to(DEVICE), dim=0, return_inverse=True)
    return lambda g: torch.zeros(int(groups.max()) + 1, *g.shape[1:], dtype=g.dtype,
                                 device=g.device).index_add_(0, groups, g)


def check(got, gold, *, atol, rtol, grouped=None):
    for name, a, e in zip(("grad hidden", "grad weight", "grad bias"), got, gold):
        if e is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        if grouped is not None and name != "grad hidden":
            a, e = grouped(a), grouped(e)
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def compare(x, w, b, y, which, *, chunk_cols, dtype=torch.float32, atol=2e-5, rtol=2e-5, frozen=(), **kw):
    """The chunked backward (default) against the fp64 reference; returns its gradients."""
    up = upstream(len(y), which)
    gold = grads(R.linear_logprobs, x, w, b, y, up, F64, frozen, **kw)
    with tiny(chunk_cols, len(y), torch.empty(0, dtype=dtype).element_size()):
        got = grads(fe.linear_logprobs, x, w, b, y, up, dtype, frozen, backend="triton", **kw)
    clamped = "topk" in kw or "clamp_p" in kw
    check(got, gold, atol=atol, rtol=rtol, grouped=tie_groups(w, b) if clamped else None)
    return got


CHUNKS = {"one": None, "several": 32}  # several: chunks of 32 columns (2 tiles), the last one ragged


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("which", list(WHICH))
def test_every_gradient_vs_fp64(which, chunks):
    # N=37 (3 row blocks), H=31 (ragged H slice), V=101 (7 tiles: chunks of 32, 32, 32, 5 columns)
    x, w, b, y = make(37, 31, 101, dup=True)
    kw = dict(softcap=4.0, temperature=0.8, logit_scale=1.3)
    if WHICH[which][2]:
        # k ends inside the 10 tied columns 28..37 of row 0 (they straddle the chunk edge at 32)
        z0 = (x[0] @ w.T + b) * 1.3
        kw["topk"] = int((z0 > z0[28]).sum()) + 4
    compare(x, w, b, y, which, chunk_cols=CHUNKS[chunks], **kw)


@pytest.mark.parametrize("frozen", [("x",), ("w",), ("x", "w")], ids=["frozen-x", "frozen-w", "bias-only"])
def test_frozen_inputs(frozen):
    x, w, b, y = make(21, 24, 70)
    got = compare(x, w, b, y, "both", chunk_cols=16, frozen=frozen, temperature=1.2)
    assert [g is None for g in got] == [n in frozen for n in ("x", "w", "b")]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_softcap_temperature_no_bias(bias):
    x, w, b, y = make(19, 16, 53, bias=bias)
    compare(x, w, b, y, "both", chunk_cols=16, softcap=2.5, temperature=1.3)


@pytest.mark.parametrize("shape", [(1, 16, 53), (5, 31, 17), (3, 8, 1)], ids=["n1", "v17", "v1"])
def test_small_shapes(shape):
    x, w, b, y = make(*shape)
    y[0] = 0
    compare(x, w, b, y, "both", chunk_cols=16, temperature=0.9)


def test_fp64():
    x, w, b, y = make(19, 31, 70, dup=True)
    z0 = x[0] @ w.T + b
    compare(x, w, b, y, "all", chunk_cols=32, dtype=F64, atol=1e-12, rtol=1e-12, softcap=3.0,
            topk=int((z0 > z0[28]).sum()) + 3)


def _errors(dtype, x, w, b, y, up, kw):
    """Max error against the fp64 gold (on the rounded inputs) of the Triton gradients and of plain
    torch's at ``dtype``, and the gold gradients' scales."""
    xr, wr, br = (t.to(dtype).double() for t in (x, w, b))
    gold = grads(R.linear_logprobs, xr, wr, br, y, up, F64, **kw)
    plain = grads(R.linear_logprobs, xr, wr, br, y, up, dtype, **kw)
    ours = grads(fe.linear_logprobs, xr, wr, br, y, up, dtype, backend="triton", **kw)
    err = lambda gs: [(a - e).abs().max().item() for a, e in zip(gs, gold)]
    return err(ours), err(plain), [g.abs().max().item() for g in gold]


def _no_worse_than_torch(dtype, ours, plain, scale):
    # gradients come back in the input dtype, so both round to it: one 16-bit ulp of the scale as margin
    eps = torch.finfo(dtype).eps
    for name, e_ours, e_torch, s in zip(("dx", "dw", "db"), ours, plain, scale):
        assert e_ours <= e_torch + eps * s, f"{name}: triton {e_ours:.3g} vs torch {e_torch:.3g} (+{eps * s:.2g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_several_chunks(dtype):
    x, w, b, y = make(33, 48, 90)
    with tiny(32, 33, 2):
        errs = _errors(dtype, x, w, b, y, upstream(33, "both"), dict(softcap=4.0, temperature=0.8))
    _no_worse_than_torch(dtype, *errs)


def test_shipped_bf16_tile():
    # the shipped 128 x 64 x 32 bf16 tile, just past one tile in N, H and V; chunks of one tile
    c = C.get("linear_grad", "bf16")
    assert (c.block_n, c.block_v, c.block_h) == (128, 64, 32)
    n, h, v = 130, 40, 131
    x, w, b, y = make(n, h, v)
    with C.override(grad_buffer_bytes=n * 2 * c.block_v):
        assert _launch.grad_chunk(n, v, 2, c.block_v) == c.block_v
        errs = _errors(torch.bfloat16, x, w, b, y, upstream(n, "both"), dict(softcap=5.0))
    _no_worse_than_torch(torch.bfloat16, *errs)


class _Spy:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def _backward_once(frozen=()):
    x, w, b, y = make(9, 16, 40)
    with tiny(16, 9):
        return grads(fe.linear_logprobs, x, w, b, y, upstream(9, "both"), torch.float32, frozen, backend="triton")


def test_backward_launches_the_dz_kernel_once_per_chunk(monkeypatch):
    spy = _Spy(_launch.linear_dz_kernel)
    monkeypatch.setattr(_launch, "linear_dz_kernel", spy)
    _backward_once()
    assert spy.calls == 3  # V = 40 in chunks of 16 columns, one row block: one launch per chunk


def test_backward_kernel_has_no_atomics():
    # the only atomics of the package are the radix histogram's int32 adds (kernels/_radix.py)
    import inspect

    from fused_entropy.kernels import _online, linear_grad, linear_stats

    for src in (inspect.getsource(linear_grad), inspect.getsource(_online.tile_grad.fn),
                inspect.getsource(linear_stats.linear_logit_tile.fn)):
        assert "tl.atomic" not in src


def test_deterministic_mode_backward_is_bitwise_reproducible(monkeypatch):
    if DEVICE == "cuda":
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _backward_once(), _backward_once()
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


def test_grad_chunk_respects_the_bound(monkeypatch):
    monkeypatch.delenv("FUSED_ENTROPY_GRAD_BUFFER_MB", raising=False)
    assert C.grad_buffer_bytes() == C.GRAD_BUFFER_BYTES == 256 * 2**20
    # 8192 bf16 rows: 256 MiB hold 16384 columns
    assert _launch.grad_chunk(8192, 151936, 2, 64) == 16384
    assert _launch.grad_chunk(8192, 10000, 2, 64) == 10000  # one chunk: the whole vocabulary
    monkeypatch.setenv("FUSED_ENTROPY_GRAD_BUFFER_MB", "0.5")
    assert C.grad_buffer_bytes() == 2**19
    for n, itemsize in ((1000, 2), (1000, 4), (3, 8)):
        vc = _launch.grad_chunk(n, 10**6, itemsize, 64)
        assert vc % 64 == 0 and n * vc * itemsize <= 2**19 < n * (vc + 64) * itemsize
    assert _launch.grad_chunk(10**6, 10**6, 2, 64) == 64  # at least one tile, whatever the bound
    with C.override(grad_buffer_bytes=4096):  # override wins over the environment
        assert C.grad_buffer_bytes() == 4096
    monkeypatch.setenv("FUSED_ENTROPY_GRAD_BUFFER_MB", "-1")
    with pytest.raises(ValueError, match="FUSED_ENTROPY_GRAD_BUFFER_MB"):
        C.grad_buffer_bytes()


def test_empty_rows_and_no_upstream_gradient():
    x = torch.zeros(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    out = fe.linear_logprobs(x, w, torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton")
    (out.logprobs.sum() + out.entropy.sum()).backward()
    assert x.grad.shape == (0, 16) and (w.grad == 0).all()
    xs, ws, bs, ys = (t.float().to(DEVICE) if t.is_floating_point() else t.to(DEVICE) for t in make(5, 16, 30))
    with tiny(16, 5):
        stats = triton_backend.linear_forward(xs, ws, bs, ys, LogitTransform(), -100, True, None)
        gx, gw, gb = triton_backend.linear_backward(xs, ws, bs, ys, LogitTransform(), -100, stats, None, None, None,
                                                    None)
    assert (gx == 0).all() and (gw == 0).all() and (gb == 0).all()
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32


@pytest.mark.skipif(DEVICE != "cuda", reason="run-to-run bitwise equality is a GPU property: the interpreter runs "
                                             "programs one after another, in a fixed order")
def test_two_runs_bitwise_equal_on_cuda():
    g = torch.Generator().manual_seed(0)
    n, h, v = 1024, 512, 5000
    x = (torch.randn(n, h, generator=g) * 2).to(DEVICE, torch.bfloat16)
    w = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(DEVICE, torch.bfloat16)
    b = torch.randn(v, generator=g).to(DEVICE, torch.bfloat16)
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    up = [torch.randn(n, generator=g, device="cpu").to(DEVICE) for _ in range(2)]

    def once():
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fe.linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], entropy=True, topk=50, backend="triton")
        loss = (out.logprobs * up[0]).sum() + (out.entropy * up[1]).sum() + out.clamped_entropy.sum()
        return torch.autograd.grad(loss, leaves)

    with C.override(grad_buffer_bytes=n * 2 * 1024):  # 5 chunks of 1024 columns
        first, second = once(), once()
    for a, e in zip(first, second):
        assert torch.equal(a, e)
