"""Numerics of the row statistics at extreme logit magnitudes and temperatures (issue 13, items 1 and 15).

The log-sum-exp is kept as (row max m, log s) and never rounded into ``lse = m + log s``: in fp32 that
sum loses ``log s`` once ``|m|`` is large (the spacing of fp32 at 1e8 is 8), and ``z - lse`` was then
off by O(1) (``RowStats``). The examples of the issue are checked with their exact values; then the
error of both backends against an fp64 gold result is compared with plain torch's at the same
precision over magnitudes up to 1e30 and temperatures down to 1e-4.

"Plain torch" is ``log_softmax`` and ``-sum p log p`` in fp32 on the same fp32 logits ``z`` the
kernels form (``a * fp32(1/T)``, MATH.md section 1): at |z| ~ 1e30 one ulp of z is 1e23, so two ways
of rounding ``a / T`` give different rows, and the bar would measure the transform, not the
statistics. The gold result runs the same formulas in fp64 on the fp32 inputs. Clamped entropy
uses the tie rule of MATH.md section 3 (ties at the threshold share the remaining weight) in all
three, so that gradients at exact ties compare.
"""
import math

import pytest
import torch

import fused_entropy as fe
from fused_entropy import reference as R
from fused_entropy._distributed import merge_row_stats

from _dist_utils import run_ranks
from conftest import DEVICE, TRITON_SKIP, needs_cpu_ranks

F32, F64 = torch.float32, torch.float64
EPS = torch.finfo(F32).eps


def _grads(fn, a, up):
    """Outputs of ``fn(a)`` and d(sum u * out)/da for each output and its upstream ``u``, all fp64."""
    leaf = a.detach().clone().requires_grad_(True)
    outs = [o for o in fn(leaf) if o is not None]  # TokenStats: the fields asked for
    grads = []
    for o, u in zip(outs, up):
        (g,) = torch.autograd.grad((o.double() * u).sum(), leaf, retain_graph=True)
        grads.append(g.double())
    return [o.detach().double() for o in outs], grads


# ---------------------------------------------------------------------------------------------
# the examples, exactly
# ---------------------------------------------------------------------------------------------


def _logits_case(z, y, backend, **kw):
    z = z.to(DEVICE).requires_grad_(True)
    st = fe.logprobs_from_logits(z, y.to(DEVICE), backend=backend, entropy=True, **kw)
    (g_lp,) = torch.autograd.grad(st.logprobs.sum(), z, retain_graph=True)
    (g_ent,) = torch.autograd.grad(st.entropy.sum(), z)
    return st.logprobs.detach().cpu(), st.entropy.detach().cpu(), g_lp.cpu(), g_ent.cpu()


@pytest.mark.parametrize("offset", [1e8, -1e8, 1e4, 1e30])
def test_two_equal_logits_at_a_large_offset(backend, offset):
    # was: Triton log-prob 0.0 at 1e8 (-0.693359 at 1e4), d logp/dz = [0, -1] and dH/dz = [-0.693, -0.693]
    lp, ent, g_lp, g_ent = _logits_case(torch.tensor([[offset, offset]]), torch.tensor([0]), backend)
    assert lp.item() == pytest.approx(-math.log(2), abs=1e-7)
    assert ent.item() == pytest.approx(math.log(2), abs=1e-7)
    torch.testing.assert_close(g_lp, torch.tensor([[0.5, -0.5]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(g_ent, torch.zeros(1, 2), atol=1e-7, rtol=0)


@pytest.mark.parametrize("offset", [1e8, -1e8])
def test_fifty_equal_logits_at_a_large_offset(backend, offset):
    # was: Triton log-prob 0 (right -log 50 = -3.912)
    lp, ent, g_lp, g_ent = _logits_case(torch.full((2, 50), offset), torch.tensor([0, 49]), backend)
    torch.testing.assert_close(lp, torch.full((2,), -math.log(50)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, torch.full((2,), math.log(50)), atol=1e-6, rtol=0)
    want = torch.full((2, 50), -1 / 50)
    want[0, 0] += 1
    want[1, 49] += 1
    torch.testing.assert_close(g_lp, want, atol=1e-7, rtol=0)
    torch.testing.assert_close(g_ent, torch.zeros(2, 50), atol=1e-7, rtol=0)


def test_linear_head_at_a_large_offset(backend):
    # z = h . W_v = [1e8, 1e8]: the fused head (forward, backward, and with top-k the logits buffer)
    h = torch.tensor([[1.0]], device=DEVICE, requires_grad=True)
    w = torch.tensor([[1e8], [1e8]], device=DEVICE, requires_grad=True)
    for topk in (None, 1):
        st = fe.linear_logprobs(h, w, torch.tensor([0], device=DEVICE), backend=backend, topk=topk)
        assert st.logprobs.item() == pytest.approx(-math.log(2), abs=1e-7)
        assert st.entropy.item() == pytest.approx(math.log(2), abs=1e-7)
        loss = st.logprobs.sum() + st.entropy.sum() + (0 if topk is None else st.clamped_entropy.sum())
        g_h, g_w = torch.autograd.grad(loss, [h, w])
        torch.testing.assert_close(g_w.cpu(), torch.tensor([[0.5], [-0.5]]), atol=1e-7, rtol=0)
        torch.testing.assert_close(g_h.cpu(), torch.zeros(1, 1), atol=1e-7 * 1e8, rtol=0)  # 0.5e8 - 0.5e8


def test_clamped_entropy_at_a_large_offset(backend):
    # top-3 of [o, o, o, o - 1e4, ...]: three of the four tied maxima, H~ = log 3, zero gradient
    o = 1e8
    z = torch.tensor([[o, o, o, o, o - 1e4, o - 2e4]])
    z = z.to(DEVICE).requires_grad_(True)
    st = fe.logprobs_from_logits(z, torch.tensor([0], device=DEVICE), backend=backend, topk=3)
    assert st.clamped_entropy.item() == pytest.approx(math.log(3), abs=1e-6)
    (g,) = torch.autograd.grad(st.clamped_entropy.sum(), z)
    torch.testing.assert_close(g.cpu(), torch.zeros(1, 6), atol=1e-7, rtol=0)


def test_small_temperature_integer_logits_gradient(backend):
    # was: gradient error 2e-4 at T = 1e-3 where plain fp32 torch gets 4e-8 (z = 1000 * integers)
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-4, 5, (6, 33), generator=g).float()
    y = torch.randint(0, 33, (6,), generator=g)
    up = [torch.randn(6, generator=g, dtype=F64) for _ in range(2)]
    fn = lambda be: lambda x: tuple(fe.logprobs_from_logits(x, y.to(x.device), backend=be, temperature=1e-3))[:2]  # noqa: E731
    gold = _grads(lambda x: _plain(x, y, 1e-3, None)[:2], a.double(), up)
    plain = _grads(lambda x: _plain(x, y, 1e-3, None)[:2], a, up)
    got = _grads(fn(backend), a.to(DEVICE), [u.to(DEVICE) for u in up])
    # the gradients are 1/T = 1000 times dz: the floor is 8 eps of their size (about 1e-3 here),
    # the old error was 1e-2
    _no_worse_than_plain(got, gold, plain, "T=1e-3")


def test_vocab_parallel_merge_at_a_large_offset():
    # two shards of [1e8, 1e8] each, the target in shard 1: log p = -log 4, H = log 4
    m_r = torch.tensor([[1e8], [1e8]])
    log_s_r = torch.full((2, 1), math.log(2))
    d_r = torch.tensor([[0.0], [0.0]])  # z_y - m_r on the target's shard
    here = torch.tensor([[False], [True]])
    ent_r = torch.full((2, 1), math.log(2))
    m, log_s, dy, ent = merge_row_stats(m_r, log_s_r, d_r, here, ent_r)
    assert m.item() == 1e8 and log_s.item() == pytest.approx(math.log(4), abs=1e-7)
    assert (dy - log_s).item() == pytest.approx(-math.log(4), abs=1e-7)
    assert ent.item() == pytest.approx(math.log(4), abs=1e-7)
    # a shard of only -inf logits takes no part; a row of only -inf logits stays m = -inf, log s = 0
    m, log_s, dy, ent = merge_row_stats(torch.tensor([[1e8, -math.inf], [-math.inf, -math.inf]]),
                                        torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2),
                                        torch.tensor([[True, False], [False, False]]), torch.zeros(2, 2))
    assert m.tolist() == [1e8, -math.inf] and log_s.tolist() == [0.0, 0.0] and ent.tolist() == [0.0, 0.0]
    assert dy[0].item() == 0.0


# ---------------------------------------------------------------------------------------------
# fuzz: magnitudes up to 1e30, temperatures down to 1e-4, against fp64 and plain torch
# ---------------------------------------------------------------------------------------------


def _plain(a, y, temperature, k, logit_scale=1.0):
    """logp, H and (with k) the clamped H of fp32 (or fp64) logits ``a`` in plain torch (see the module
    docstring): z = a * scale * fp(1/T), log_softmax, H = -sum p log p, H~ over the top-k with ties
    at the threshold sharing the remaining weight."""
    z = a * torch.tensor(logit_scale, dtype=a.dtype) if logit_scale != 1.0 else a
    z = z * torch.tensor(1.0 / temperature, dtype=a.dtype)
    lp_all = torch.log_softmax(z, -1)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    lp = lp_all.gather(1, y[:, None].to(a.device)).squeeze(1)
    if k is None:
        return lp, ent
    zd = z.detach()
    tau = zd.topk(k, -1).values[:, -1:]
    gt, eq = zd > tau, zd == tau
    w = (gt + (k - gt.sum(-1, keepdim=True)) / eq.sum(-1, keepdim=True) * eq).to(z.dtype)
    inside = w > 0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    log_w = torch.where(inside, torch.log(torch.where(inside, w, torch.ones_like(w))), zero)
    lq = torch.log_softmax(torch.where(inside, z - zd.amax(-1, keepdim=True) + log_w, -torch.inf), -1)
    ent_c = -torch.where(inside, lq.exp() * (torch.where(inside, lq, zero) - log_w), zero).sum(-1)
    return lp, ent, ent_c


def _no_worse_than_plain(got, gold, plain, what):
    """Per row: |got - gold| <= 2 |plain - gold| + 8 eps max(1, |gold|) (row max for gradients)."""
    for j, kind in enumerate(("value", "grad")):
        for i, (k, o, p) in enumerate(zip(got[j], gold[j], plain[j])):
            k = k.cpu()
            e_k, e_p, scale = (k - o).abs(), (p - o).abs(), o.abs()
            if kind == "grad":
                e_k, e_p, scale = e_k.amax(-1), e_p.amax(-1), scale.amax(-1)
            bound = 2 * e_p + 8 * EPS * scale.clamp(min=1.0)
            bad = e_k > bound
            assert not bad.any(), f"{what}: output {i} {kind}: error {e_k[bad].tolist()} > {bound[bad].tolist()}"


# (offset, spread) of fp32 logits a = offset + spread * randn; None: small integers
MAGNITUDES = {"unit": (0.0, 3.0), "1e4": (1e4, 3.0), "-1e8": (-1e8, 30.0), "1e15": (1e15, 1e9),
              "1e30": (1e30, 1e23), "-1e30-equal": (-1e30, 0.0), "wide-1e30": (0.0, 1e30), "integers": (0.0, None)}
TEMPERATURES = (1.0, 0.7, 1e-3, 1e-4)


def _fuzz_logits(name, seed, n=6, v=40):
    g = torch.Generator().manual_seed(seed)
    off, spread = MAGNITUDES[name]
    if spread is None:
        a = torch.randint(-3, 4, (n, v), generator=g).float()
    else:
        a = (off + spread * torch.randn(n, v, generator=g, dtype=F64)).float()
    y = torch.randint(0, v, (n,), generator=g)
    up = [torch.randn(n, generator=g, dtype=F64) for _ in range(3)]
    return a, y, up


@pytest.mark.parametrize("magnitude", list(MAGNITUDES))
def test_fuzz_logits_against_fp64(backend, magnitude):
    k = 7
    for i, temperature in enumerate(TEMPERATURES):
        a, y, up = _fuzz_logits(magnitude, seed=i)
        gold = _grads(lambda x: _plain(x, y, temperature, k), a.double(), up)
        plain = _grads(lambda x: _plain(x, y, temperature, k), a, up)
        got = _grads(lambda x: tuple(fe.logprobs_from_logits(x, y.to(DEVICE), backend=backend, temperature=temperature,
                                                             topk=k)), a.to(DEVICE), [u.to(DEVICE) for u in up])
        _no_worse_than_plain(got, gold, plain, f"{magnitude} T={temperature}")


@pytest.mark.parametrize("offset", [0.0, 1e4, -1e6, 1e8, 2.0**100], ids=["0", "1e4", "-1e6", "1e8", "2^100"])
def test_fuzz_linear_head_against_fp64(backend, offset):
    """The fused head: integer h and W (every product order gives the same exact logits) plus a bias
    at ``offset``; logit_scale and temperature scale them further (|z| up to ~1e34)."""
    g = torch.Generator().manual_seed(7)
    n, hdim, v, k = 5, 8, 37, 6
    h = torch.randint(-2, 3, (n, hdim), generator=g).float()
    w = torch.randint(-2, 3, (v, hdim), generator=g).float()
    b = (offset + torch.randint(-3, 4, (v,), generator=g).double()).float()
    y = torch.randint(0, v, (n,), generator=g)
    up = [torch.randn(n, generator=g, dtype=F64) for _ in range(3)]
    for temperature, scale in ((1.0, 1.0), (1e-3, 1.0), (1e-4, 3.0), (0.7, 0.5)):
        # gradients with respect to h (through dz, the same dz that gives the W gradient)
        gold = _grads(lambda hh: _plain(hh @ w.double().T + b.double(), y, temperature, k, scale), h.double(), up)
        plain = _grads(lambda hh: _plain(hh @ w.T + b, y, temperature, k, scale), h, up)
        got = _grads(lambda hh: tuple(fe.linear_logprobs(hh, w.to(DEVICE), y.to(DEVICE), bias=b.to(DEVICE),
                                                         backend=backend, temperature=temperature, logit_scale=scale,
                                                         topk=k)), h.to(DEVICE), [u.to(DEVICE) for u in up])
        _no_worse_than_plain(got, gold, plain, f"offset={offset} T={temperature} scale={scale}")


# ---------------------------------------------------------------------------------------------
# the vocabulary-parallel merge across ranks
# ---------------------------------------------------------------------------------------------


def _offset_head():
    """Row 0: four equal logits 1e8; row 1: 1e8 + 8 [0, 1, 2, -1] (fp32 spacing at 1e8 is 8), so with
    T = 8 the logits are 1.25e7 + [0, 1, 2, -1], exact in fp32."""
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.stack([torch.full((4,), 1e8), 1e8 + 8 * torch.tensor([0.0, 1.0, 2.0, -1.0])], 1)
    return h, w, torch.tensor([0, 2])


def _vocab_parallel_worker(rank, world, backend):
    import torch.distributed as dist

    h, w, y = _offset_head()
    shard = w[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
    st = fe.linear_logprobs(h, shard, y, temperature=8.0, topk=3, backend=backend, process_group=dist.group.WORLD)
    (g_w,) = torch.autograd.grad(st.logprobs.sum() + st.entropy.sum() + st.clamped_entropy.sum(), shard)
    return [t.detach() for t in (st.logprobs, st.entropy, st.clamped_entropy, g_w)]


@needs_cpu_ranks
def test_vocab_parallel_at_a_large_offset(backend, tmp_path):
    h, w, y = _offset_head()
    # gold: the shifted formulas in fp64 (the reference's lse - sum p z cancels even in fp64 at 1e7)
    w64 = w.double().requires_grad_(True)
    want = _plain(h.double() @ w64.T, y, 8.0, 3)
    (g_w,) = torch.autograd.grad(sum(t.sum() for t in want), w64)
    results = run_ranks(_vocab_parallel_worker, 2, tmp_path, backend, timeout_s=120)
    for rank, (lp, ent, ent_c, g) in enumerate(results):
        for got, ref in ((lp, want[0]), (ent, want[1]), (ent_c, want[2]), (g, g_w[2 * rank: 2 * rank + 2])):
            torch.testing.assert_close(got.double(), ref.detach(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# fp64 inputs keep fp64 scalars (item 15): Triton types a Python float argument fp32 unless told
# ---------------------------------------------------------------------------------------------


def _fp64_case(path):
    g = torch.Generator().manual_seed(11)
    n, hdim, v = 6, 12, 45
    h = torch.randn(n, hdim, generator=g, dtype=F64)
    w = torch.randn(v, hdim, generator=g, dtype=F64)
    b = torch.randn(v, generator=g, dtype=F64)
    y = torch.randint(0, v, (n,), generator=g)
    up = [torch.randn(n, generator=g, dtype=F64) for _ in range(3)]
    return h, w, b, y, up


# temperature 0.7, softcap 23.3 and logit_scale 1.3 are not fp32 numbers: rounded to fp32 they move
# every result by ~1e-8 relative, 1e4 times the tolerance
FP64_SCALARS = {"temperature": dict(temperature=0.7), "all": dict(temperature=0.7, softcap=23.3, logit_scale=1.3)}
_SCALAR_KERNELS = ("linear_stats_kernel", "linear_dz_kernel", "linear_radix_kernel",
                   "logits_stats_kernel", "logits_grad_kernel", "logits_radix_kernel")


class _Fp32FloatArgs:
    """A kernel whose Python-float arguments arrive rounded to fp32, as Triton passes them on a GPU."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kw: launch(*(torch.tensor(a, dtype=F32).item() if isinstance(a, float) else a
                                            for a in args), **kw)


@pytest.fixture
def gpu_float_args(monkeypatch):
    """Off CUDA, the interpreter passes a Python float argument on as a double and would hide the
    rounding: round them here as a GPU does, so the test sees what the fp64 kernels read."""
    if DEVICE != "cuda":
        from fused_entropy import _launch
        for name in _SCALAR_KERNELS:
            monkeypatch.setattr(_launch, name, _Fp32FloatArgs(getattr(_launch, name)))


@TRITON_SKIP
@pytest.mark.parametrize("path,scalars", [("logits", "temperature"), ("logits-topk", "temperature"),
                                          ("linear", "temperature"), ("linear", "all"), ("linear-topk", "all")])
def test_fp64_scalars_keep_fp64_precision(path, scalars, gpu_float_args):
    """fp64 kernels read the scalars from ``scal_ptr``, not from the fp32-typed arguments. On CUDA
    (``FUSED_ENTROPY_TEST_DEVICE=cuda``) the kernels are compiled; on CPU ``gpu_float_args`` rounds
    the float arguments as a GPU would."""
    kw = FP64_SCALARS[scalars]
    h, w, b, y, up = _fp64_case(path)
    k = 9 if path.endswith("topk") else None
    with torch.no_grad():
        logits = h @ w.T + b

    def gold_fn(x):
        st = R.logprobs_from_logits(x, y, topk=k, **kw)
        return tuple(t for t in st if t is not None)

    if path.startswith("logits"):  # logprobs_from_logits takes a temperature only
        want = _grads(gold_fn, logits, up)
        got = _grads(lambda x: tuple(t for t in fe.logprobs_from_logits(x, y.to(DEVICE), backend="triton", topk=k, **kw)
                                     if t is not None), logits.to(DEVICE), [u.to(DEVICE) for u in up])
    else:
        want = _grads(lambda hh: gold_fn(hh @ w.T + b), h, up)
        got = _grads(lambda hh: tuple(t for t in fe.linear_logprobs(hh, w.to(DEVICE), y.to(DEVICE), bias=b.to(DEVICE),
                                                                    backend="triton", topk=k, **kw) if t is not None),
                     h.to(DEVICE), [u.to(DEVICE) for u in up])
    for j in (0, 1):
        for a, o in zip(got[j], want[j]):
            torch.testing.assert_close(a.cpu(), o, rtol=1e-12, atol=1e-12)


@TRITON_SKIP
@pytest.mark.parametrize("k", [None, 9], ids=["full", "topk"])
def test_fp64_scalars_single_pass(k, gpu_float_args):
    """``LinearGRPOLoss``'s single pass (logits buffer, dz in place) with fp64 scalars."""
    from fused_entropy._types import LogitTransform
    from fused_entropy.backends import triton as triton_backend

    kw = FP64_SCALARS["all"]
    h, w, b, y, up = _fp64_case("single")
    hh = h.clone().requires_grad_(True)
    st = R.linear_logprobs(hh, w, y, bias=b, topk=k, **kw)
    outs = [t for t in st if t is not None]
    (want,) = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, up)), hh)
    tf = LogitTransform(kw["temperature"], kw["softcap"], kw["logit_scale"])
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    ups = [dev(u) for u in up]
    stats, gx, _, _ = triton_backend.linear_forward_backward(
        dev(h), dev(w), dev(b), dev(y), tf, -100, True, k,
        lambda sl, *_: (ups[0][sl], ups[1][sl], ups[2][sl] if k is not None else None))
    torch.testing.assert_close(stats.logprobs.cpu(), st.logprobs.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx.cpu(), want, rtol=1e-12, atol=1e-12)
