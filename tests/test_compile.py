"""torch.compile and torch.library: the entry points are custom ops (``torch.ops.fused_entropy``).

``fullgraph=True`` (any graph break raises), one graph across sequence lengths with dynamic shapes
(``error_on_recompile``), results and gradients equal to eager, meta tensors propagate shapes, and
``torch.library.opcheck`` on every op. Backends: torch always; triton on CUDA or under
``TRITON_INTERPRET=1``.
"""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch._dynamo.utils import counters

import fused_entropy as fe
from fused_entropy.backends import interpreting

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch"] + (["triton"] if CUDA or interpreting() else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _head(n_rows, h=8, v=13, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n_rows, h, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    w = torch.randn(v, h, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True) if bias else None
    y = torch.randint(0, v, (2, n_rows), generator=g).to(DEVICE)
    y[0, 0] = -100
    return x, w, b, y


def _linear_loss(backend, **opts):
    def f(x, w, b, y):
        s = fe.linear_logprobs(x, w, y, bias=b, backend=backend, **opts)
        out = s.logprobs.sum()
        if s.entropy is not None:
            out = out + 0.5 * s.entropy.sum()
        if s.clamped_entropy is not None:
            out = out + 0.25 * s.clamped_entropy.sum()
        return out

    return f


def _grads(fn, *args):
    out = fn(*args)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return (out.detach(),) + torch.autograd.grad(out, inputs)


def _run_across_lengths(fn, make_args, lengths, compile_backend="aot_eager"):
    """Compile once with dynamic shapes, call over several lengths (a recompile raises); return the number
    of graphs. (The backend may be called twice for that one graph: dynamo restarts the analysis once
    to turn the float options into tensors.)"""
    cnt = torch._dynamo.testing.CompileCounterWithBackend(compile_backend)
    compiled = torch.compile(fn, backend=cnt, fullgraph=True, dynamic=True)
    for i, n in enumerate(lengths):
        args = make_args(n)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = _grads(compiled, *args)
        want = _grads(fn, *args)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert cnt.frame_count >= 1
    return counters["stats"]["unique_graphs"]


def test_ops_are_registered():
    ops = torch.ops.fused_entropy
    for name in ("linear_logprobs", "linear_logprobs_backward", "logprobs_from_logits",
                 "logprobs_from_logits_backward", "grpo_objective"):
        assert hasattr(ops, name), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{}, {"topk": 3}, {"entropy": False, "softcap": 4.0, "temperature": 0.7}],
                         ids=["entropy", "topk", "no-entropy-softcap"])
def test_linear_logprobs_fullgraph_no_recompile(backend, opts):
    graphs = _run_across_lengths(_linear_loss(backend, **opts), lambda n: _head(n, seed=n), [3, 5, 9])
    assert graphs == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_fullgraph_frozen_weight_no_bias(backend):
    def make(n):
        x, w, _, y = _head(n, seed=n, bias=False)
        return x, w.detach(), None, y

    assert _run_across_lengths(_linear_loss(backend), make, [4, 6]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{}, {"clamp_p": 0.5, "temperature": 1.3}], ids=["entropy", "clamp_p"])
def test_logprobs_from_logits_fullgraph_no_recompile(backend, opts):
    def f(z, y):
        s = fe.logprobs_from_logits(z, y, backend=backend, **opts)
        out = s.logprobs.sum() + 0.5 * s.entropy.sum()
        return out if s.clamped_entropy is None else out + 0.25 * s.clamped_entropy.sum()

    def make(n):
        g = torch.Generator().manual_seed(n)
        z = torch.randn(2, n, 11, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
        y = torch.randint(0, 11, (2, n), generator=g).to(DEVICE)
        y[1, -1] = -100
        return z, y

    assert _run_across_lengths(f, make, [3, 5, 8]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool-mask", "float-mask"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "sapo"])
def test_grpo_loss_fullgraph_no_recompile(loss_type, mask_dtype, backend):
    def f(lp, old, ent, adv, mask):
        loss, metrics = fe.grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, loss_type=loss_type,
                                     entropy_coef=0.01, beta=0.05, ref_logprobs=old, backend=backend)
        return loss + 0 * metrics["clip_ratio/region_mean"]

    def make(t):
        g = torch.Generator().manual_seed(t)
        lp = (-torch.rand(3, t, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(True)
        old = lp.detach() + 0.1 * torch.randn(3, t, generator=g, dtype=torch.float64).to(DEVICE)
        ent = torch.rand(3, t, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_(True)
        adv = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
        mask = (torch.rand(3, t, generator=g) > 0.3).to(DEVICE)
        mask[:, 0] = True
        return lp, old, ent, adv, mask.to(mask_dtype)

    assert _run_across_lengths(f, make, [4, 7, 10]) == 1


def test_eager_still_checks_values():
    x, w, b, y = _head(3)
    y = y.clone()
    y[1, 1] = 99
    with pytest.raises(ValueError, match=r"targets must be in \[0, 13\) or equal ignore_index=-100; found 99"):
        fe.linear_logprobs(x, w, y, bias=b)


def test_meta_tensors_propagate_shapes():
    x = torch.empty(2, 7, 16, device="meta")
    w = torch.empty(50, 16, device="meta")
    y = torch.empty(2, 7, dtype=torch.long, device="meta")
    s = fe.linear_logprobs(x, w, y, topk=5)
    for t in (s.logprobs, s.entropy, s.clamped_entropy):
        assert t.device.type == "meta" and t.shape == (2, 7) and t.dtype == torch.float32
    stats = torch.ops.fused_entropy.linear_logprobs(x.reshape(14, 16), w, None, y.reshape(14), 1.0, None, 1.0,
                                                    -100, False, None, "torch")
    assert [tuple(t.shape) for t in stats] == [(14,), (14,), (14,), (0,), (0,), (0,), (0,), (0,)]
    z = torch.empty(3, 50, device="meta", dtype=torch.float64)
    s = fe.logprobs_from_logits(z, torch.empty(3, dtype=torch.long, device="meta"))
    assert s.logprobs.shape == (3,) and s.entropy.dtype == torch.float64 and s.clamped_entropy is None


def _opcheck_samples():
    x, w, b, y = _head(5)
    x = x.detach().reshape(10, 8).requires_grad_(True)
    yf = y.reshape(10)
    z = torch.randn(10, 13, dtype=torch.float64, device=DEVICE, requires_grad=True)
    lin = torch.ops.fused_entropy.linear_logprobs
    lg = torch.ops.fused_entropy.logprobs_from_logits
    return [
        (lin, (x, w, b, yf, 1.0, None, 1.0, -100, True, None, "torch")),
        (lin, (x, w, None, yf, 0.8, 3.0, 0.5, -100, True, 4, "torch")),
        (lg, (z, yf, 1.0, -100, True, None, "torch")),
        (lg, (z, yf, 0.9, -100, False, 3, "torch")),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _opcheck_samples()[case]
    torch.library.opcheck(op, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the GRPO objective op runs the Triton kernel")
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "no-grad"])
def test_opcheck_grpo_objective(compute_grad):
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(3, 6, generator=g, dtype=torch.float64)).to(DEVICE).requires_grad_(compute_grad)
    old = (lp.detach() + 0.1).contiguous()
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).to(DEVICE)
    valid = (torch.rand(3, 6, generator=g) > 0.3).to(DEVICE)
    row_scale = torch.rand(3, generator=g, dtype=torch.float64).to(DEVICE)
    floats = [0.2, 0.28, 0.05, 1.0, 1.05, 2.0, 3.0, 2.0, 3.0, 0.0002, 1.0, 5.0, 0.0002, 1.0]
    args = (lp, old, old, adv, valid, None, None, row_scale, "dapo", [False, False, True], floats, None, compute_grad)
    torch.library.opcheck(torch.ops.fused_entropy.grpo_objective, args)


def test_double_backward_still_raises():
    x, w, b, y = _head(3)
    (gx,) = torch.autograd.grad(fe.linear_logprobs(x, w, y, bias=b).logprobs.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        gx.sum().backward()


@pytest.mark.slow
def test_linear_logprobs_inductor_matches_eager():
    assert _run_across_lengths(_linear_loss("torch", topk=3), lambda n: _head(n, seed=n), [3, 6],
                               compile_backend="inductor") == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [{"loss_type": "dapo"}, {"loss_type": "grpo", "beta": 0.1, "use_ref_model": True},
                                  {"loss_type": "bnpo", "entropy_coef": 0.01, "topk": 3}],
                         ids=["dapo", "grpo-kl", "bnpo-bonus-topk"])
def test_linear_grpo_loss_fullgraph_no_recompile(backend, opts):
    """Under compile LinearGRPOLoss takes its two-pass path (custom ops + torch): one graph."""
    mod = fe.LinearGRPOLoss(backend=backend, **opts)

    def f(x, w, b, y, mask, adv, old, ref):
        loss, _ = mod(x, w, y, mask, adv, bias=b, old_per_token_logps=old,
                            ref_per_token_logps=ref if mod.beta != 0.0 else None)
        return loss

    def make(t):
        x, w, b, y = _head(t, seed=t)
        y = y.clamp(min=0)
        g = torch.Generator().manual_seed(t + 100)
        mask = (torch.rand(2, t, generator=g) > 0.3).to(DEVICE)
        mask[:, 0] = True
        adv = torch.randn(2, generator=g, dtype=torch.float64).to(DEVICE)
        old = -torch.rand(2, t, generator=g, dtype=torch.float64).to(DEVICE)
        return x, w, b, y, mask, adv, old, old - 0.05

    assert _run_across_lengths(f, make, [4, 6, 9]) == 1
