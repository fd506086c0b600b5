"""NaN and +inf logits propagate as NaN, as ``torch.log_softmax`` does; -inf logits stay legal.

A row whose transformed logits hold a NaN, or a +inf (where log-softmax is undefined), gets NaN
log-prob, entropy and clamped entropy, and NaN gradients; every other row is untouched. Before
this, both backends dropped the NaN in guards written ``x > 0`` (false for NaN) and returned a
finite or -inf number for such a row: a silent wrong value that a GRPO ratio turns into 0.

The fp64 reference (``fused_entropy.reference``, plain torch over materialized logits) already
gives NaN there, so each backend is compared with it, NaN positions included (``equal_nan``).
"""
import math
from contextlib import nullcontext

import pytest
import torch

import fused_entropy as fe
from fused_entropy import grpo_loss, reference as R
from fused_entropy._grpo.losses import KERNEL_LOSS_TYPES, LOSSES
from fused_entropy.backends import torch_chunked
from fused_entropy.kernels import configs as C

from _inputs import grpo_inputs, linear_inputs, logits_inputs
from _dist_utils import run_ranks
from conftest import DEVICE, needs_cpu_ranks

F64 = torch.float64
NAN, INF = math.nan, math.inf
IGNORED = 6  # an ignored row holding a NaN: outputs 0 and zero gradient, as for any ignored row


def _small(backend, monkeypatch, linear):
    """Several chunks (torch) or row blocks, vocabulary tiles and splits (Triton)."""
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 150)
    monkeypatch.setattr(torch_chunked, "MIN_CHUNK_ROWS", 1)
    if linear:
        tiny = C.Config(16, 16, 16)
        return C.override(linear_stats=tiny, linear_grad=tiny, linear_radix=tiny, split=2)
    return C.override(logits_stats=C.Config(4, 16), logits_grad=C.Config(4, 32), logits_radix=C.Config(4, 16), split=2)


def _check(out, ref, grads, ref_grads, topk, rows, tol=1e-9):
    """Outputs equal the reference's (NaN where it is NaN) on ``rows``, 0 on the ignored row;
    gradients equal the reference's, NaN pattern included. The reference is the fp64 gold; ``tol``
    is 1e-9 for fp64 inputs and 5e-6 for fp32 ones, above plain fp32 torch's own error against the
    gold on these rows (3.2e-6 on outputs, 3.3e-6 on the gradient; the backends: 5e-7 and 2e-7)."""
    names = ("logprobs", "entropy") + (("clamped_entropy",) if topk else ())
    for name in names:
        got, want = getattr(out, name).double().cpu(), getattr(ref, name).double()
        torch.testing.assert_close(got[rows], want[rows], rtol=tol, atol=tol, equal_nan=True, msg=name)
        assert got[IGNORED] == 0, name
    for g, gr in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), gr.double(), rtol=tol, atol=tol, equal_nan=True)


def _loss(out, topk):
    gen = torch.Generator().manual_seed(9)
    parts = [out.logprobs, out.entropy] + ([out.clamped_entropy] if topk else [])
    return sum((p.double() * torch.randn(p.shape, generator=gen, dtype=F64).to(p.device)).sum() for p in parts)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("topk", [None, 3], ids=["plain", "topk3"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_logits_entry_nan_and_posinf(backend, topk, tiles, dtype, monkeypatch):
    logits, y = logits_inputs(8, 70, seed=4)
    logits = logits.to(dtype)
    logits[1, 5] = NAN                   # a NaN off the target
    y[2] = 11
    logits[2, 11] = NAN                  # a NaN on the target
    logits[3, 40] = INF                  # +inf: log-softmax undefined
    logits[4] = -INF
    logits[4, 3] = NAN                   # -inf everywhere but one NaN: the row max ignores NaN
    logits[5, 69] = NAN                  # in the last vocabulary tile
    logits[5, 20:30] = -INF              # legal -inf beside it
    logits[IGNORED, 7] = NAN
    y[IGNORED] = -100
    logits[7, 30:60] = -INF              # a legal row: finite outputs
    y[7] = 2
    la = logits.clone().to(DEVICE).requires_grad_(True)
    lr = logits.double().requires_grad_(True)  # the fp64 gold, also for the fp32 case
    with _small(backend, monkeypatch, linear=False) if tiles == "small" else nullcontext():
        out = fe.logprobs_from_logits(la, y.to(DEVICE), topk=topk, backend=backend)
        (g,) = torch.autograd.grad(_loss(out, topk), (la,))
    ref = R.logprobs_from_logits(lr, y, topk=topk)
    (gr,) = torch.autograd.grad(_loss(ref, topk), (lr,))
    rows = [r for r in range(8) if r != IGNORED]
    _check(out, ref, [g[rows].cpu()], [gr[rows]], topk, rows, tol=1e-9 if dtype == F64 else 5e-6)
    assert (g[IGNORED] == 0).all()
    for r in (1, 2, 3, 4, 5):
        assert out.logprobs[r].isnan() and out.entropy[r].isnan(), r
        assert not topk or out.clamped_entropy[r].isnan(), r
        assert g[r].isnan().any(), r
    assert torch.isfinite(out.logprobs[[0, 7]]).all() and torch.isfinite(g[[0, 7]]).all()


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["nocap", "softcap5"])
@pytest.mark.parametrize("topk", [None, 3], ids=["plain", "topk3"])
@pytest.mark.parametrize("tiles", ["default", "small"])
def test_linear_entry_nan_and_inf_hidden(backend, topk, tiles, softcap, monkeypatch):
    x, w, b, y = linear_inputs(8, 16, 45, seed=2)
    x[1, 3] = NAN                        # every logit of the row is NaN
    x[3, 0] = INF                        # logits of +inf and -inf (w has no zero): NaN
    x[IGNORED, 5] = NAN
    y[IGNORED] = -100
    b[[2, 17]] = -INF                    # legal -inf logits in every row
    y[(y == 2) | (y == 17)] = 0
    xa, wa, ba = (t.clone().to(DEVICE).requires_grad_(True) for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    with _small(backend, monkeypatch, linear=True) if tiles == "small" else nullcontext():
        out = fe.linear_logprobs(xa, wa, y.to(DEVICE), bias=ba, topk=topk, softcap=softcap, backend=backend)
        gx, gw, gb = torch.autograd.grad(_loss(out, topk), (xa, wa, ba))
    ref = R.linear_logprobs(xr, wr, y, bias=br, topk=topk, softcap=softcap)
    rx, rw, rb = torch.autograd.grad(_loss(ref, topk), (xr, wr, br))
    rows = [r for r in range(8) if r != IGNORED]
    # dW and db sum over every row, so the NaN rows make them NaN (as in plain torch); the ignored
    # row's NaN hidden state reaches dW through 0 * NaN in both (the README's stated exception)
    _check(out, ref, [gx[rows].cpu(), gw.cpu(), gb.cpu()], [rx[rows], rw, rb], topk, rows)
    assert (gx[IGNORED] == 0).all() and gw.isnan().any()
    # row 3 is NaN through +inf - inf, without softcap everywhere, with it (softcap(+-inf) is
    # finite) only at the -inf bias columns whose weight is positive: the reference decides
    nan_rows = [r for r in rows if ref.logprobs[r].isnan()]
    assert 1 in nan_rows and (softcap or 3 in nan_rows)
    for r in nan_rows:
        assert out.logprobs[r].isnan() and out.entropy[r].isnan() and gx[r].isnan().any(), r
        assert not topk or out.clamped_entropy[r].isnan(), r
    finite = [r for r in rows if r not in nan_rows]
    assert torch.isfinite(out.logprobs[finite]).all() and torch.isfinite(gx[finite]).all()



SAMPLING = dict(sampling_top_k=5, sampling_top_p=0.9)
SAMPLING_OUT = ("logprobs", "entropy", "truncated_logprobs", "log_kept_mass", "truncated_entropy")


def test_sampling_replay_nan_rows(backend):
    # the NaN rows must not change the others: the same call on the clean rows alone is the reference
    logits, y = logits_inputs(6, 50, seed=5)
    logits[1, 7] = NAN
    y[1] = 7  # on the target: not "dropped" (-inf) but NaN
    logits[2, 30] = INF
    logits[4, 2] = NAN
    y[4] = -100
    clean = [0, 3, 5]
    la = logits.clone().to(DEVICE).requires_grad_(True)
    lc = logits[clean].clone().to(DEVICE).requires_grad_(True)
    out = fe.logprobs_from_logits(la, y.to(DEVICE), backend=backend, **SAMPLING)
    want = fe.logprobs_from_logits(lc, y[clean].to(DEVICE), backend=backend, **SAMPLING)
    up = torch.randn(len(SAMPLING_OUT), 6, generator=torch.Generator().manual_seed(1), dtype=F64).to(DEVICE)
    (g,) = torch.autograd.grad(sum((getattr(out, f) * up[i]).sum() for i, f in enumerate(SAMPLING_OUT)), (la,))
    (gc,) = torch.autograd.grad(sum((getattr(want, f) * up[i, clean]).sum() for i, f in enumerate(SAMPLING_OUT)), (lc,))
    for f in SAMPLING_OUT:
        got = getattr(out, f)
        torch.testing.assert_close(got[clean], getattr(want, f), rtol=1e-12, atol=1e-12, msg=f)
        assert got[[1, 2]].isnan().all() and got[4] == 0, f
    torch.testing.assert_close(g[clean], gc, rtol=1e-12, atol=1e-12)
    assert g[[1, 2]].isnan().any(1).all() and (g[4] == 0).all()


def test_vocab_parallel_merge_nan_shard():
    from fused_entropy._distributed import merge_row_stats

    # row 0: shard 1 holds a NaN (its log s is NaN); row 1: shard 0 only -inf logits plus a NaN
    # (m = -inf, log s NaN); row 2: only -inf logits on both shards (legal: m = -inf, 0, 0)
    m_r = torch.tensor([[1.0, -INF, -INF], [2.0, -INF, -INF]])
    log_s_r = torch.tensor([[0.5, NAN, 0.0], [NAN, 0.0, 0.0]])
    here = torch.tensor([[True, False, False], [False, False, False]])
    m, log_s, dy, ent = merge_row_stats(m_r, log_s_r, torch.zeros(2, 3), here, torch.ones(2, 3))
    assert log_s[:2].isnan().all() and ent[:2].isnan().all()
    assert m[2] == -INF and log_s[2] == 0 and ent[2] == 0


def _vocab_parallel_nan_worker(rank, world, backend):
    import torch.distributed as dist

    x, w, b, y = linear_inputs(5, 8, 20, seed=3)
    x[1, 2] = NAN
    x[3, 0] = INF
    shard = slice(10 * rank, 10 * rank + 10)
    ws = w[shard].clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    st = fe.linear_logprobs(xs, ws, y, bias=b[shard], topk=4, backend=backend, process_group=dist.group.WORLD)
    gx, gw = torch.autograd.grad(st.logprobs.sum() + st.entropy.sum() + st.clamped_entropy.sum(), (xs, ws))
    return [t.detach() for t in (st.logprobs, st.entropy, st.clamped_entropy, gx)]


@needs_cpu_ranks
def test_vocab_parallel_nan_rows(backend, tmp_path):
    x, w, b, y = linear_inputs(5, 8, 20, seed=3)
    clean = [0, 2, 4]
    want = R.linear_logprobs(x[clean], w, y[clean], bias=b, topk=4)
    for lp, ent, ent_c, gx in run_ranks(_vocab_parallel_nan_worker, 2, tmp_path, backend, timeout_s=120):
        for got, ref in ((lp, want.logprobs), (ent, want.entropy), (ent_c, want.clamped_entropy)):
            assert got[[1, 3]].isnan().all()
            torch.testing.assert_close(got[clean].double(), ref, rtol=1e-9, atol=1e-9)
        assert gx[[1, 3]].isnan().all(1).all() and torch.isfinite(gx[clean]).all()


# every loss of the Triton objective, at each ratio level it has (the token-level ones refuse "sequence")
OBJECTIVE_CASES = [(t, lv) for t in KERNEL_LOSS_TYPES for lv in ("token", "sequence")
                   if lv == "token" or LOSSES[t].sequence]


@pytest.mark.parametrize("loss_type,level", OBJECTIVE_CASES, ids=[f"{t}-{lv}" for t, lv in OBJECTIVE_CASES])
def test_grpo_objective_nan_logprob(backend, loss_type, level):
    # a NaN log-prob at a kept token makes the loss and its gradient NaN on both backends (the
    # Triton objective's min/max/clamp used to drop the NaN: a finite loss); at a masked token
    # it changes nothing
    lp, old, ref, adv, mask, isr, ent, _ = (t.to(DEVICE) for t in grpo_inputs(4, 6, seed=7, masked=0.0))
    kw = dict(loss_type=loss_type, old_logprobs=old, entropy=ent, entropy_coef=0.01, backend=backend,
              importance_sampling_level=level, max_completion_length=6)
    clean, _ = grpo_loss(lp, adv, mask, **kw)
    masked_pos = (~mask).nonzero()[0].tolist()  # grpo_inputs never keeps the last row's last two
    lp_m = lp.clone()
    lp_m[masked_pos[0], masked_pos[1]] = NAN
    lp_m.requires_grad_(True)
    at_mask, _ = grpo_loss(lp_m, adv, mask, **kw)
    torch.testing.assert_close(at_mask, clean, rtol=1e-12, atol=1e-12)
    lp_v = lp.clone()
    lp_v[0, 0] = NAN  # grpo_inputs always keeps token (0, 0)
    lp_v.requires_grad_(True)
    loss, metrics = grpo_loss(lp_v, adv, mask, **kw)
    assert loss.isnan()
    # the clip fractions count a NaN ratio as not clipped, on both backends alike
    _, metrics_torch = grpo_loss(lp_v.detach(), adv, mask, **{**kw, "backend": "torch"})
    for key in [k for k in metrics if k.startswith("clip_ratio/")]:
        assert torch.isfinite(metrics[key]) and metrics[key] == metrics_torch[key], key
    (g,) = torch.autograd.grad(loss, (lp_v,))
    # VESPO's weight is detached and NaN -> 0 (Liger/TRL's nan_to_num): its gradient there is 0
    assert g[0, 0].isnan() if loss_type != "vespo" else g[0, 0] == 0


@pytest.mark.parametrize("single_pass", [False, None], ids=["two_pass", "auto"])
@pytest.mark.parametrize("entropy_coef", [0.0, 0.01], ids=["no_bonus", "bonus"])
def test_linear_grpo_loss_nan_hidden(backend, single_pass, entropy_coef):
    # end to end: a NaN hidden state at a kept token gives a NaN loss (it was finite on the Triton
    # backend without the bonus: the objective's clip dropped the NaN ratio); at a masked token
    # the loss is that of the clean batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=g, dtype=F64)
    w = torch.randn(30, 8, generator=g, dtype=F64)
    ids = torch.randint(0, 30, (2, 4), generator=g)
    mask = torch.ones(2, 4)
    mask[1, 3] = 0
    adv = torch.tensor([1.0, -0.5], dtype=F64)
    old = -torch.rand(2, 4, generator=g, dtype=F64)
    loss_fn = fe.LinearGRPOLoss(beta=0.0, backend=backend, single_pass=single_pass, entropy_coef=entropy_coef)

    def run(xx):
        xa = xx.clone().to(DEVICE).requires_grad_(True)
        loss, _ = loss_fn(xa, w.to(DEVICE), ids.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE),
                          old_per_token_logps=old.to(DEVICE))
        (gx,) = torch.autograd.grad(loss, (xa,))
        return loss, gx

    clean, g_clean = run(x)
    x_bad = x.clone()
    x_bad[0, 1, 2] = NAN
    loss, gx = run(x_bad)
    assert loss.isnan() and gx[0, 1].isnan().all()
    x_pad = x.clone()
    x_pad[1, 3, 2] = NAN
    loss, gx = run(x_pad)
    torch.testing.assert_close(loss, clean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, g_clean, rtol=1e-12, atol=1e-12)


def _vocab_parallel_neg_inf_nan_worker(rank, world, backend, sampling):
    import torch.distributed as dist

    # every logit -inf but one NaN, in rank 1's shard: a MAX all-reduce may drop the NaN (gloo keeps
    # or drops it by operand order), so the row max alone cannot tell this row from an all -inf one
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    w = torch.randn(8, 4, generator=g, dtype=F64)
    b = torch.full((8,), -INF, dtype=F64)
    b[6] = 0.0
    w[6, 0] = NAN
    shard = slice(4 * rank, 4 * rank + 4)
    xs = x.clone().requires_grad_(True)
    kw = dict(sampling_top_k=2) if sampling else {}
    st = fe.linear_logprobs(xs, w[shard].clone(), torch.tensor([1, 6, 2]), bias=b[shard].clone(), backend=backend,
                            process_group=dist.group.WORLD, **kw)
    (gx,) = torch.autograd.grad(st.logprobs.sum() + st.entropy.sum(), (xs,))
    return [t.detach() for t in (st.logprobs, st.entropy, gx)]


@needs_cpu_ranks
@pytest.mark.parametrize("sampling", [False, True], ids=["plain", "sampling"])
def test_vocab_parallel_neg_inf_and_nan_rows(backend, sampling, tmp_path):
    for lp, ent, gx in run_ranks(_vocab_parallel_neg_inf_nan_worker, 2, tmp_path, backend, sampling, timeout_s=120):
        assert lp.isnan().all() and ent.isnan().all() and gx.isnan().any(1).all()
