"""The row-chunk logits buffer of the Triton backend (issue 15, items 4 and 5).

Clamped entropy: the forward GEMM stores each row chunk's logits z in the bounded buffer and the radix
digits after the first are selected from it, so the forward makes one GEMM pass; checked against the
fp64 reference (``reference.linear_logprobs``) for topk and clamp_p, ties at the boundary (duplicated W
rows), one and several row chunks, tiny tiles and the shipped tile just over one tile.

Single pass: ``LinearGRPOLoss`` on the Triton backend forms the gradients in the forward from the same
buffer (3 GEMM passes) and equals the torch backend's single pass: loss, metrics, every gradient.

Runs on CUDA, or on CPU with TRITON_INTERPRET=1.
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import LinearGRPOLoss
from fused_entropy import _launch
from fused_entropy import reference as R
from fused_entropy._types import LogitTransform
from fused_entropy.backends import torch_chunked
from fused_entropy.backends import triton as triton_backend
from fused_entropy.kernels import configs as C

from conftest import DEVICE, TRITON_SKIP

pytestmark = TRITON_SKIP
F64 = torch.float64
TINY = C.Config(16, 16, 16)
TINY_F64 = C.Config(32, 32, 16)  # compiled fp64 dots need 32 x 32 (see test_triton_backward.py)


def tiny(rows=None, vocab=None, dtype=torch.float32, with_dz=False, **kw):
    """Tiny blocks; with ``rows``, a logits-buffer bound giving chunks of that many rows."""
    cfg = TINY_F64 if dtype == F64 else TINY
    if rows is not None:
        acc, e = (8 if dtype == F64 else 4), torch.empty(0, dtype=dtype).element_size()
        dz = e if with_dz and e != acc else 0  # fp32/fp64: dz in place over z
        kw["logits_buffer_bytes"] = rows * _launch._z_stride(vocab, cfg.block_v) * (acc + dz)
    return C.override(linear_stats=cfg, linear_grad=cfg, linear_radix=cfg, logits_stats=C.Config(4, 16),
                      logits_radix=C.Config(4, 16), logits_grad=C.Config(4, 32), split=2, **kw)


def make(n, h, v, *, seed=0, dup=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64) * 2
    w = torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)
    b = torch.randn(v, generator=g, dtype=F64)
    if dup:
        # duplicated (W row, bias): exactly tied logits in every row, columns 9..12 and 39..46
        w[10:13], b[10:13] = w[9], b[9]
        w[40:47], b[40:47] = w[39], b[39]
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    return x, w, b, y


class Launches:
    """Counts kernel launches by name through the launcher's module globals."""

    def __init__(self, monkeypatch, *names):
        self.count = {n: 0 for n in names}
        for name in names:
            kernel = getattr(_launch, name)
            monkeypatch.setattr(_launch, name, self._wrap(name, kernel))

    def _wrap(self, name, kernel):
        counts = self.count

        class Wrapped:
            def __getitem__(self, grid):
                counts[name] += 1
                return kernel[grid]

        return Wrapped()


def up(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=F64).to(DEVICE) for _ in range(3)]


def grads_of(fn, x, w, b, y, dtype, upstream, round_to=None, **kw):
    """Outputs and gradients of sum(upstream . outputs) in ``dtype``, from inputs rounded to ``round_to``."""
    leaves = [t.detach().to(round_to or dtype).to(DEVICE, dtype).requires_grad_() for t in (x, w, b)]
    out = fn(leaves[0], leaves[1], y.to(DEVICE), bias=leaves[2], entropy=True, **kw)
    loss = sum((p.double() * u).sum() for p, u in zip((out.logprobs, out.entropy, out.clamped_entropy), upstream))
    return out, [g.double() for g in torch.autograd.grad(loss, leaves)]


def tie_sum(w, b):
    key = torch.cat([w, b[:, None]], 1).to(DEVICE)
    _, groups = torch.unique(key, dim=0, return_inverse=True)
    return lambda g: torch.zeros(int(groups.max()) + 1, *g.shape[1:], dtype=g.dtype,
                                 device=g.device).index_add_(0, groups, g)


def against_fp64(x, w, b, y, *, dtype=torch.float32, rows=None, atol=2e-5, ctx=None, **kw):
    """Forward (log-probs, entropy, clamped entropy) and every gradient against the fp64 reference;
    dW and db per tie group of columns (torch.topk keeps arbitrary members of a tie group)."""
    upstream = up(len(y))
    gold, g_gold = grads_of(R.linear_logprobs, x, w, b, y, F64, upstream, round_to=dtype, **kw)
    with ctx if ctx is not None else tiny(rows, w.shape[0], dtype):
        got, g_got = grads_of(fe.linear_logprobs, x, w, b, y, dtype, upstream, backend="triton", **kw)
    for name in ("logprobs", "entropy", "clamped_entropy"):
        a, e = getattr(got, name).double(), getattr(gold, name)
        torch.testing.assert_close(a, e, atol=atol, rtol=atol, msg=lambda m: f"{name}: {m}")
    grouped = tie_sum(w, b)
    for name, a, e in zip(("dx", "dw", "db"), g_got, g_gold):
        if name != "dx":
            a, e = grouped(a), grouped(e)
        tol = atol if dtype not in (torch.bfloat16, torch.float16) else max(atol, 2 * torch.finfo(dtype).eps * e.abs().max().item())
        torch.testing.assert_close(a, e, atol=tol, rtol=atol, msg=lambda m: f"{name}: {m}")
    return got


# ---------------------------------------------------------------------------------------------
# clamped entropy: one GEMM pass, the radix digits after the first from the buffer
# ---------------------------------------------------------------------------------------------

K = {"k1": dict(topk=1), "k40": dict(topk=40), "kV": dict(topk=101), "p0.33": dict(clamp_p=0.33),
     "p0.2": dict(clamp_p=0.2)}
CHUNKS = {"one": None, "several": 16}  # several: 16-row chunks of 37 rows (16 + 16 + 5)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("kcase", list(K))
def test_clamped_vs_fp64(kcase, chunks):
    x, w, b, y = make(37, 24, 101)
    against_fp64(x, w, b, y, rows=CHUNKS[chunks], temperature=0.8, softcap=4.0, **K[kcase])


def test_forward_is_one_gemm_pass_per_chunk(monkeypatch):
    """No GEMM recompute: one linear_stats launch per row chunk, no linear_radix launch, and the
    buffer passes (logits_radix) as many per chunk as there are digits after the first."""
    seen = Launches(monkeypatch, "linear_stats_kernel", "linear_radix_kernel", "logits_radix_kernel")
    x, w, b, y = (t.to(DEVICE) for t in make(37, 24, 101))
    with tiny(16, 101):
        triton_backend.linear_forward(x.float(), w.float(), b.float(), y, LogitTransform(), -100, True, 40)
    digits = len(C.RADIX_DIGITS[32])
    assert seen.count == {"linear_stats_kernel": 3, "linear_radix_kernel": 0, "logits_radix_kernel": 3 * (digits - 1)}
    assert _launch.radix_gemm_passes(torch.float32) == 1
    assert _launch.radix_buffer_passes(torch.float32) == digits - 1
    assert _launch.radix_buffer_passes(F64) == len(C.RADIX_DIGITS[64]) - 1


def test_plain_forward_allocates_no_buffer(monkeypatch):
    """Without top-k nothing is stored: the kernel gets no z pointer."""
    calls = []
    real = _launch._linear_stats_pass

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(_launch, "_linear_stats_pass", spy)
    x, w, b, y = (t.to(DEVICE).float() if t.is_floating_point() else t.to(DEVICE) for t in make(9, 16, 40, dup=False))
    with tiny():
        triton_backend.linear_forward(x, w, b, y, LogitTransform(), -100, True, None)
    assert calls == [None]


@pytest.mark.parametrize("chunks", list(CHUNKS))
def test_tie_group_straddles_the_boundary(chunks):
    """k lands inside the 8 tied columns 39..46 of row 0: tau is one of the stored z exactly (tie_frac
    3/8), and the backward's recomputed z meets it (the grouped gradients match the reference)."""
    x, w, b, y = make(37, 24, 101)
    y[0] = 3
    z0 = x[0] @ w.T + b
    k = int((z0 > z0[39]).sum()) + 3
    with tiny(CHUNKS[chunks], 101):
        stats = triton_backend.linear_forward(*(t.float().to(DEVICE) for t in (x, w, b)), y.to(DEVICE),
                                              LogitTransform(), -100, True, k)
    assert stats.tie_frac[0].item() == pytest.approx(3 / 8)
    want = torch_chunked.linear_forward(*(t.float().to(DEVICE) for t in (x, w, b)), y.to(DEVICE),
                                        LogitTransform(), -100, True, k)
    torch.testing.assert_close(stats.tie_frac, want.tie_frac)
    against_fp64(x, w, b, y, rows=CHUNKS[chunks], topk=k)


def test_chunks_give_the_whole_batch_selection():
    """tau and tie_frac are bitwise the same with one chunk and with several: the chunks' tiles are
    the whole batch's (chunks are whole row blocks)."""
    x, w, b, y = (t.to(DEVICE) for t in make(37, 24, 101))
    args = (x.float(), w.float(), b.float(), y, LogitTransform(temperature=0.7, softcap=5.0), -100, True, 33)
    with tiny():
        one = triton_backend.linear_forward(*args)
    with tiny(16, 101):
        several = triton_backend.linear_forward(*args)
    assert torch.equal(one.tau, several.tau) and torch.equal(one.tie_frac, several.tie_frac)
    torch.testing.assert_close(one.clamped_entropy, several.clamped_entropy, atol=1e-6, rtol=1e-6)


def test_buffer_rows_are_whole_row_blocks_within_the_bound():
    with C.override(linear_stats=TINY, logits_buffer_bytes=40 * 112 * 4):
        assert _launch.buffer_rows(1000, 101, torch.float32) == 32  # 40 rows fit: 2 blocks of 16
        assert _launch.buffer_rows(20, 101, torch.float32) == 20  # everything fits: one chunk
        # bf16 single pass: z fp32 + dz bf16 per element
        assert _launch.buffer_rows(1000, 101, torch.bfloat16, with_dz=True) == 16
    with C.override(linear_stats=TINY, logits_buffer_bytes=1):
        assert _launch.buffer_rows(1000, 101, torch.float32) == 16  # at least one row block


def test_logits_buffer_knob(monkeypatch):
    monkeypatch.delenv("FUSED_ENTROPY_LOGITS_BUFFER_MB", raising=False)
    assert C.logits_buffer_bytes() == C.LOGITS_BUFFER_BYTES == 2**30
    monkeypatch.setenv("FUSED_ENTROPY_LOGITS_BUFFER_MB", "0.5")
    assert C.logits_buffer_bytes() == 2**19
    with C.override(logits_buffer_bytes=4096):  # override wins over the environment
        assert C.logits_buffer_bytes() == 4096
    monkeypatch.setenv("FUSED_ENTROPY_LOGITS_BUFFER_MB", "-1")
    with pytest.raises(ValueError, match="FUSED_ENTROPY_LOGITS_BUFFER_MB"):
        C.logits_buffer_bytes()
    with pytest.raises(ValueError, match="logits_buffer_bytes"):
        with C.override(logits_buffer_bytes=0):
            pass


def test_fp64_several_chunks():
    x, w, b, y = make(40, 16, 101)
    against_fp64(x, w, b, y, dtype=F64, rows=32, atol=1e-10, topk=45, temperature=1.3)


def test_bf16_several_chunks():
    x, w, b, y = make(37, 32, 101)
    against_fp64(x, w, b, y, dtype=torch.bfloat16, rows=16, atol=1e-4, clamp_p=0.2)


@pytest.mark.parametrize("chunks", ["one", "several"])
def test_shipped_bf16_tile_just_over_one_tile(chunks):
    """The shipped bf16 tile (128 x 64 x 32) at N, V just over one tile; several: 128-row chunks."""
    x, w, b, y = make(130, 40, 131)
    cfg = C.get("linear_stats", "bf16")
    kw = {}
    if chunks == "several":
        kw["logits_buffer_bytes"] = cfg.block_n * _launch._z_stride(131, cfg.block_v) * 4
    ctx = C.override(**kw)
    with ctx:
        assert _launch.buffer_rows(130, 131, torch.bfloat16) == (128 if chunks == "several" else 130)
    against_fp64(x, w, b, y, dtype=torch.bfloat16, atol=1e-4, ctx=C.override(**kw), topk=70, temperature=0.9)


# ---------------------------------------------------------------------------------------------
# the single pass of LinearGRPOLoss
# ---------------------------------------------------------------------------------------------


def grpo_data(dtype, *, bsz=3, seqlen=7, hidden=24, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, seqlen, hidden, generator=g, dtype=F64)
    w = torch.randn(vocab, hidden, generator=g, dtype=F64) / math.sqrt(hidden) * 2
    w[10:13] = w[9]  # ties
    b = torch.randn(vocab, generator=g, dtype=F64) * 0.3
    b[10:13] = b[9]
    ids = torch.randint(0, vocab, (bsz, seqlen), generator=g)
    mask = torch.ones(bsz, seqlen, dtype=F64)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        lp = torch.log_softmax((x @ w.T + b) / 0.8, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = lp + 0.3 * torch.randn(bsz, seqlen, generator=g, dtype=F64)
    ref = lp + 0.2 * torch.randn(bsz, seqlen, generator=g, dtype=F64)
    adv = torch.randn(bsz, generator=g, dtype=F64)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(x=dev(x.to(dtype)), w=dev(w.to(dtype)), b=dev(b.to(dtype)), ids=dev(ids), mask=dev(mask),
                adv=dev(adv), old=dev(old), ref=dev(ref))


def run_module(d, backend, **cfg):
    m = LinearGRPOLoss(backend=backend, **cfg)
    leaves = [d[k].clone().requires_grad_() for k in ("x", "w", "b")]
    loss, metrics = m(leaves[0], leaves[1], d["ids"], d["mask"], d["adv"], bias=leaves[2],
                      old_per_token_logps=d["old"], ref_per_token_logps=d["ref"])
    loss.backward()
    return m, loss.detach(), metrics, dict(m.last_metrics), [t.grad for t in leaves]


SINGLE = {
    "dapo-bonus-T": dict(loss_type="dapo", beta=0.04, entropy_coef=0.05, temperature=0.8),
    "grpo-clamped-bonus": dict(loss_type="grpo", entropy_coef=0.05, entropy_source="clamped", topk=40,
                               temperature=0.8),
    "bnpo-clamp_p-softcap": dict(loss_type="bnpo", beta=0.04, entropy_coef=0.03, entropy_source="clamped",
                                 clamp_p=0.3, softcap=3.0, logit_scale=1.5),
    "gspo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence", entropy_coef=0.02, topk=20),
}


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("name", list(SINGLE))
def test_single_pass_equals_torch_backend(name, chunks):
    """Triton single pass == torch single pass: loss, Liger metrics, every last_metrics entry, dX, dW, db;
    both report the single pass."""
    cfg = SINGLE[name]
    d = grpo_data(torch.float32)
    rows = 16 if chunks == "several" else None
    with tiny(rows, 101, with_dz=True):
        m_t, *r_t = run_module(d, "triton", **cfg)
    m_c, *r_c = run_module(d, "torch", **cfg)
    assert m_t.last_path == m_c.last_path == "single"
    loss_t, met_t, last_t, g_t = r_t
    loss_c, met_c, last_c, g_c = r_c
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(loss_t, loss_c, **tol)
    for a, e in zip(met_t, met_c):
        torch.testing.assert_close(a, e, **tol)
    assert set(last_t) == set(last_c)
    for key in last_c:
        torch.testing.assert_close(last_t[key], last_c[key], **tol, msg=lambda m: f"{key}: {m}")
    for what, a, e in zip(("dx", "dw", "db"), g_t, g_c):
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a, e, **tol, msg=lambda m: f"{what}: {m}")


def test_single_pass_uses_the_buffer_not_the_two_pass_kernels(monkeypatch):
    """The Triton single pass launches one forward GEMM per chunk and dz from the buffer: no backward
    recompute (linear_dz_kernel), no radix recompute (linear_radix_kernel)."""
    seen = Launches(monkeypatch, "linear_stats_kernel", "linear_dz_kernel", "linear_radix_kernel",
                    "logits_grad_kernel")
    d = grpo_data(torch.float32)
    with tiny(8, 101, with_dz=True):
        m, *_ = run_module(d, "triton", loss_type="dapo", entropy_coef=0.05, entropy_source="clamped", topk=30)
    assert m.last_path == "single"
    n_rows = int(d["mask"].sum())  # token-level: only the rows inside the mask are computed
    chunks = math.ceil(n_rows / 16)  # 8-row bound -> one 16-row block per chunk
    assert seen.count == {"linear_stats_kernel": chunks, "linear_dz_kernel": 0, "linear_radix_kernel": 0,
                          "logits_grad_kernel": chunks}


def test_single_pass_fp64_and_frozen_weight():
    d = grpo_data(F64)
    cfg = dict(loss_type="dapo", entropy_coef=0.05, entropy_source="clamped", topk=40, temperature=0.8)
    with tiny(32, 101, dtype=F64, with_dz=True):
        _, loss_t, _, _, g_t = run_module(d, "triton", **cfg)
    _, loss_c, _, _, g_c = run_module(d, "torch", **cfg)
    torch.testing.assert_close(loss_t, loss_c, atol=1e-10, rtol=1e-10)
    for a, e in zip(g_t, g_c):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    # a frozen head: no dW product, the other gradients unchanged
    m = LinearGRPOLoss(backend="triton", **cfg)
    x, b = d["x"].clone().requires_grad_(), d["b"].clone().requires_grad_()
    with tiny(32, 101, dtype=F64, with_dz=True):
        loss, _ = m(x, d["w"], d["ids"], d["mask"], d["adv"], bias=b, old_per_token_logps=d["old"],
                    ref_per_token_logps=d["ref"])
    loss.backward()
    assert m.last_path == "single"
    torch.testing.assert_close(x.grad, g_c[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(b.grad, g_c[2], atol=1e-10, rtol=1e-10)


def test_single_pass_bf16_close_to_fp64():
    """bf16: dz enters the gradient GEMMs in bf16 (as in the two-pass backward); against the fp64
    torch single pass the error is within a few bf16 ulps of each gradient's scale."""
    cfg = dict(loss_type="dapo", entropy_coef=0.05, temperature=0.8)
    d16 = grpo_data(torch.bfloat16)
    with tiny(16, 101, dtype=torch.bfloat16, with_dz=True):
        m, loss_t, _, _, g_t = run_module(d16, "triton", **cfg)
    assert m.last_path == "single"
    d64 = {k: (v.double() if k in ("x", "w", "b") else v) for k, v in d16.items()}
    _, loss_c, _, _, g_c = run_module(d64, "torch", **cfg)
    torch.testing.assert_close(loss_t.double(), loss_c, atol=1e-4, rtol=1e-4)
    eps = torch.finfo(torch.bfloat16).eps
    for a, e in zip(g_t, g_c):
        torch.testing.assert_close(a.double(), e, atol=2 * eps * e.abs().max().item(), rtol=2 * eps)


def test_backend_reports_single_pass_rows():
    with C.override(linear_stats=TINY, logits_buffer_bytes=40 * 112 * 6):
        assert triton_backend.single_pass_rows(1000, 101, torch.bfloat16) == 32
        assert triton_backend.single_pass_rows(1000, 101, torch.float32) == 48  # dz in place over z
