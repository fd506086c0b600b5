"""torch.distributed: vocabulary-parallel LM head (tensor parallelism) and data-parallel statistics.

Every test forks 2 or 3 CPU processes joined by a gloo group (``_dist_utils.run_ranks``, bounded by
a timeout) and compares what each rank gets with the single-process result over the whole
vocabulary / all tokens, computed here in the parent.
"""

import pytest
import torch
import torch.distributed as dist

from _dist_utils import run_ranks
from fused_entropy import linear_logprobs
from fused_entropy.backends import interpreting
from fused_entropy.integrations.verl import linear_cross_entropy

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

# Global vocabulary of 17 split unevenly (a 1-row shard included).
SHARDS = {2: (6, 11), 3: (4, 1, 12)}
N_LEAD, H = (3, 4), 7
VOCAB = 17
IGNORE = -100


def _shard(t, world, rank):
    if t is None:
        return None
    o = sum(SHARDS[world][:rank])
    return t[o : o + SHARDS[world][rank]]


def _head(dtype, case):
    """hidden [3, 4, H], weight [V, H], bias [V], targets [3, 4] and the loss weights [3, 3, 4]."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(*N_LEAD, H, generator=g, dtype=torch.float64)
    w = torch.randn(VOCAB, H, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    y = torch.randint(0, VOCAB, N_LEAD, generator=g)
    y[0, 1] = IGNORE
    y[2, 3] = IGNORE
    a = torch.randn(3, *N_LEAD, generator=g, dtype=torch.float64)
    if case == "ties":
        # rows with hidden 0 have logits = bias exactly; equal bias values sit in different shards of
        # both layouts (columns 2, 5, 9, 14), at the boundary of the top-5 set
        b = torch.linspace(-2.0, 1.0, VOCAB, dtype=torch.float64)
        b[[2, 5, 9, 14]] = 0.5
        b[[0, 16]] = 2.0  # two above the ties: k = 5 takes 3 of the 4 tied logits
        x[1] = 0.0
        x[2, :2] = 0.0
    if case == "neg_inf":
        # whole shards of -inf bias (rank 1's single row in the 3-rank layout, rows 3-5 in the 2-rank
        # one); topk=16 reaches into the -inf logits (tau = -inf, tied)
        b[[3, 4, 5]] = -torch.inf
    if case == "all_neg_inf":  # every logit -inf: log-prob -inf, entropies 0, gradients 0 (never NaN)
        b[:] = -torch.inf
    if case == "empty":
        x, y, a = x[:0], y[:0], a[:, :0]
    return x.to(dtype), w.to(dtype), b.to(dtype), y, a


CASES = {
    "logp_entropy": dict(),
    "transform": dict(temperature=0.7, softcap=3.0, logit_scale=1.3),
    "topk3": dict(topk=3),
    "ties": dict(topk=5),
    "clamp_p": dict(clamp_p=0.3),
    "neg_inf": dict(topk=16),
    "clamp_p_transform": dict(clamp_p=0.25, temperature=1.4, softcap=2.5),
    "all_neg_inf": dict(topk=2),
    "empty": dict(topk=2),
}
# which outputs the loss uses, per case (the others get no gradient, i.e. None upstream)
USES = {"logp_entropy": (1, 1, 0), "transform": (1, 0, 0), "topk3": (1, 1, 1), "ties": (0, 0, 1),
        "clamp_p": (1, 1, 1), "neg_inf": (1, 1, 1), "clamp_p_transform": (0, 1, 1), "all_neg_inf": (1, 1, 1),
        "empty": (1, 1, 1)}


def _forward_backward(x, w, b, y, a, case, **extra):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    st = linear_logprobs(x, w, y, bias=b, ignore_index=IGNORE, **CASES[case], **extra)
    loss = 0.0
    for use, out, ai in zip(USES[case], st, a):
        if use:
            loss = loss + (out * ai.to(out.dtype)).sum()
    loss.backward()
    outs = [None if t is None else t.detach() for t in st]
    return outs, x.grad, w.grad, b.grad


def _tp_cases(rank, world, dtypes, cases, backend):
    res = {}
    for dtype in dtypes:
        for case in cases:
            x, w, b, y, a = _head(dtype, case)
            res[(dtype, case)] = _forward_backward(x, _shard(w, world, rank), _shard(b, world, rank), y, a, case,
                                                   process_group=dist.group.WORLD, backend=backend)
    return res


def _tp_worker(rank, world, dtypes, cases, backend):
    res = _tp_cases(rank, world, dtypes, cases, backend)
    dp = [dist.new_group([r]) for r in range(world)][rank]  # tensor parallelism only: no data parallelism
    for dtype in dtypes:
        for case in MODULE_CASES:
            inputs = _module_inputs(dtype, case)
            res[("module", dtype, case)] = _module_loss(inputs, case, world=world, rank=rank,
                                                        process_group=dist.group.WORLD, dp_group=dp)
    # hidden_grad="partial": each rank's share, summed by the caller
    x, w, b, y, a = _head(torch.float64, "topk3")
    res["partial"] = _forward_backward(x, _shard(w, world, rank), _shard(b, world, rank), y, a, "topk3",
                                       process_group=dist.group.WORLD, hidden_grad="partial")[1]
    return res


# LinearGRPOLoss with the head split over the ranks (two passes through linear_logprobs)
MODULE_CASES = {
    "dapo_bonus_8020": dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.5, beta=0.04),
    "grpo_clamped_bonus": dict(loss_type="grpo", entropy_coef=0.03, entropy_source="clamped", clamp_p=0.3,
                               beta=0.0, temperature=0.8),
    "kl_cov_topk_ref_input": dict(loss_type="kl_cov", kl_cov_ratio=0.2, topk=4, beta=0.1),
}


def _module_inputs(dtype, case):
    g = torch.Generator().manual_seed(11)
    bsz, seq = 2, 5
    x = torch.randn(bsz, seq, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(VOCAB, H, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[1, 3:] = 0
    adv = torch.randn(bsz, generator=g, dtype=torch.float64).to(dtype)
    old = (-torch.rand(bsz, seq, generator=g, dtype=torch.float64) * 3).to(dtype)
    ref = (-torch.rand(bsz, seq, generator=g, dtype=torch.float64) * 3).to(dtype)
    ref_x = torch.randn(bsz, seq, H, generator=g, dtype=torch.float64).to(dtype)
    ref_w = torch.randn(VOCAB, H, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, ids, mask, adv, old, ref, ref_x, ref_w


def _module_loss(inputs, case, world=None, rank=None, **kw):
    from fused_entropy import LinearGRPOLoss

    x, w, b, ids, mask, adv, old, ref, ref_x, ref_w = inputs
    if world is not None:
        w, b, ref_w = (_shard(t, world, rank) for t in (w, b, ref_w))
    loss_fn = LinearGRPOLoss(**MODULE_CASES[case], **kw)
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    if case == "kl_cov_topk_ref_input":  # the reference log-probs from the (sharded) reference head
        loss, metrics = loss_fn(x, w, ids, mask, adv, bias=b, old_per_token_logps=old, ref_input=ref_x,
                                ref_weight=ref_w)
    else:
        loss, metrics = loss_fn(x, w, ids, mask, adv, bias=b, old_per_token_logps=old, ref_per_token_logps=ref)
    loss.backward()
    assert world is None or loss_fn.last_path == "two"
    return loss.detach(), x.grad, w.grad, b.grad, loss_fn.last_metrics


def _tol(dtype):
    # fp32: the shards' statistics are merged in another order than one process sums them
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=3e-6)


def _check_against_single_process(results, world, dtypes, cases, backend="torch"):
    for dtype in dtypes:
        for case in cases:
            x, w, b, y, a = _head(dtype, case)
            outs, gx, gw, gb = _forward_backward(x, w, b, y, a, case, backend="torch")
            for rank, res in enumerate(results):
                got_outs, got_gx, got_gw, got_gb = res[(dtype, case)]
                where = f"{case} {dtype} rank {rank}/{world}"
                for name, g, want in zip(("logprobs", "entropy", "clamped_entropy"), got_outs, outs):
                    assert (g is None) == (want is None), f"{where}: {name}"
                    if want is not None:
                        torch.testing.assert_close(g, want, **_tol(dtype), msg=lambda m: f"{where} {name}: {m}")
                torch.testing.assert_close(got_gx, gx, **_tol(dtype), msg=lambda m: f"{where} d hidden: {m}")
                torch.testing.assert_close(got_gw, _shard(gw, world, rank), **_tol(dtype),
                                           msg=lambda m: f"{where} d weight: {m}")
                torch.testing.assert_close(got_gb, _shard(gb, world, rank), **_tol(dtype),
                                           msg=lambda m: f"{where} d bias: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_single_process(world, tmp_path):
    dtypes = (torch.float64, torch.float32)
    results = run_ranks(_tp_worker, world, tmp_path, dtypes, tuple(CASES), "torch")
    _check_against_single_process(results, world, dtypes, tuple(CASES))
    for dtype in dtypes:
        for case in MODULE_CASES:
            loss, gx, gw, gb, metrics = _module_loss(_module_inputs(dtype, case), case)
            for rank, res in enumerate(results):
                got = res[("module", dtype, case)]
                where = f"LinearGRPOLoss {case} {dtype} rank {rank}/{world}"
                torch.testing.assert_close(got[0], loss, **_tol(dtype), msg=lambda m: f"{where} loss: {m}")
                torch.testing.assert_close(got[1], gx, **_tol(dtype), msg=lambda m: f"{where} d _input: {m}")
                torch.testing.assert_close(got[2], _shard(gw, world, rank), **_tol(dtype),
                                           msg=lambda m: f"{where} d lin_weight: {m}")
                torch.testing.assert_close(got[3], _shard(gb, world, rank), **_tol(dtype),
                                           msg=lambda m: f"{where} d bias: {m}")
                for name in ("entropy", "clamped_entropy", "kl", "cov/selected_mean"):
                    if name in metrics:
                        torch.testing.assert_close(got[4][name], metrics[name], **_tol(dtype))
    # the tie case really has a tie at tau spread over shards, and -inf really is tau in neg_inf
    x, w, b, y, a = _head(torch.float64, "ties")
    z = x[1, 0] @ w.T + b
    assert (z == torch.topk(z, 5).values[-1]).sum() == 4
    # partial hidden gradients add up to the full one and differ from it
    x, w, b, y, a = _head(torch.float64, "topk3")
    full = _forward_backward(x, w, b, y, a, "topk3")[1]
    parts = [r["partial"] for r in results]
    torch.testing.assert_close(sum(parts), full, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(parts[0], full)


def _count_all_reduce(fn):
    """Run ``fn()``; return the number of ``all_reduce`` calls it made and their [dtype, shape]."""
    calls, real = [], dist.all_reduce

    def counting(t, *args, **kwargs):
        calls.append((t.dtype, tuple(t.shape)))
        return real(t, *args, **kwargs)

    dist.all_reduce = counting
    try:
        fn()
    finally:
        dist.all_reduce = real
    return calls


def _tp_triton_worker(rank, world, cases):
    from fused_entropy.kernels import configs as C

    # tiny tiles: several row blocks and vocabulary tiles, split differently on the two shards
    # (6 columns: 2 tiles, 2 padded columns; 11 columns: 3 tiles, 1 padded), the last row block ragged
    tiles = C.Config(8, 4, 8)
    with C.override(linear_stats=tiles, linear_radix=tiles, linear_grad=tiles, split=2):
        res = _tp_cases(rank, world, (torch.float32,), cases, "triton")
        res.update(_tp_cases(rank, world, (torch.float64,), ("ties",), "triton"))
        x, w, b, y, a = _head(torch.float32, "ties")
        res["collectives"] = _count_all_reduce(lambda: linear_logprobs(
            x, _shard(w, world, rank), y, bias=_shard(b, world, rank), ignore_index=IGNORE, topk=5,
            process_group=dist.group.WORLD, backend="triton"))
    return res


TRITON_CASES = ("logp_entropy", "transform", "topk3", "ties", "clamp_p", "neg_inf", "clamp_p_transform",
                "all_neg_inf", "empty")


@pytest.mark.skipif(not interpreting(), reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1 (as CI runs)")
def test_vocab_parallel_triton_backend_interpreted(tmp_path):
    """The Triton backend on 2 ranks with uneven shards equals one process: log-probs, entropy and
    clamped entropy (its own radix select on all-reduced histograms: small k, clamp_p, a tie at tau
    spread over both shards, -inf logits at tau, rows of only -inf, N = 0) and every gradient."""
    results = run_ranks(_tp_triton_worker, 2, tmp_path, TRITON_CASES, timeout_s=120)
    _check_against_single_process(results, 2, (torch.float32,), TRITON_CASES)
    _check_against_single_process(results, 2, (torch.float64,), ("ties",))
    # the forward with clamped entropy: one all_reduce per radix digit of the [N, 2048] int32 histogram,
    # one of the [2, 1, N] shifted sums, no other
    n = N_LEAD[0] * N_LEAD[1]
    from fused_entropy.kernels.configs import RADIX_DIGITS, RADIX_NBINS

    want = [(torch.int32, (n, RADIX_NBINS))] * len(RADIX_DIGITS[32]) + [(torch.float32, (2, 1, n))]
    for rank, res in enumerate(results):
        assert res["collectives"] == want, f"rank {rank}: {res['collectives']}"


# --- bad input: the same error path on every rank, never a hang ---------------------------------

def _bad_calls(rank, world):
    """(name, thunk) pairs; each thunk is one collective call that must fail on every rank."""
    x, w, b, y, a = _head(torch.float32, "logp_entropy")
    ws, bs = _shard(w, world, rank), _shard(b, world, rank)
    group = dist.group.WORLD

    def call(**kw):
        args = dict(hidden=x, weight=ws, targets=y, bias=bs, process_group=group)
        args.update(kw)
        return lambda: linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)

    y_out = y.clone()
    y_out[1, 2] = VOCAB  # one past the global vocabulary (a valid id of no shard)
    y_neg = y.clone()
    y_neg[0, 0] = -3
    y_other = y.clone()
    if rank == 1:
        y_other[2, 0] = (y_other[2, 0] + 1) % VOCAB  # this rank's targets differ from the others'
    wide = torch.randn(*N_LEAD, H + 1)
    return [
        ("vocab_size", call(vocab_size=VOCAB + 1)),
        ("target_out", call(targets=y_out)),
        ("target_neg", call(targets=y_neg)),
        ("target_none", call(targets=torch.where(y == IGNORE, 0, y).clone().index_fill_(0, torch.tensor([1]), VOCAB),
                             ignore_index=None)),
        ("H_mismatch", call(hidden=wide, weight=torch.randn(ws.shape[0], H + 1)) if rank == world - 1 else call()),
        ("targets_differ", call(targets=y_other)),
        ("dtype_one_rank", call(bias=bs.double()) if rank == 0 else call()),
        ("topk_too_big", call(topk=VOCAB + 1)),
        ("options_differ", call(topk=2) if rank == 1 else call()),
        # verl adapter: no ignore index (-100 is an error); one rank's bad label count fails everywhere
        ("verl_label", lambda: linear_cross_entropy(x.reshape(-1, H), ws, y.reshape(-1), 1.0, "none", group)),
        ("verl_shape", lambda: linear_cross_entropy(x.reshape(-1, H), ws, y.reshape(-1)[: 11 if rank == 1 else 12],
                                                    1.0, "none", group)),
    ]


def _bad_worker(rank, world):
    out = {}
    for name, thunk in _bad_calls(rank, world):
        try:
            thunk()
            out[name] = ("no error", "")
        except (ValueError, TypeError) as e:
            out[name] = (type(e).__name__, str(e))
        # the group is still in step: a good call right after gives the right answer
        x, w, b, y, a = _head(torch.float64, "topk3")
        st = linear_logprobs(x, _shard(w, world, rank), y, bias=_shard(b, world, rank), topk=3,
                             process_group=dist.group.WORLD)
        out[name + "/after"] = st.clamped_entropy
    return out


BAD_MESSAGES = {
    "vocab_size": r"shards \(weight.shape\[0\] per rank: \[4, 1, 12\]\) add up to 17, but vocab_size=18",
    "target_out": r"targets must be global ids in \[0, 17\) or equal ignore_index=-100 .*found 17",
    "target_neg": r"targets must be global ids in \[0, 17\).*found -3",
    "target_none": r"targets must be global ids in \[0, 17\) \(the shards.*found 17",
    "H_mismatch": r"hidden size H must be the same on every rank, got \[7, 7, 8\]",
    "targets_differ": r"targets differ across ranks",
    "topk_too_big": r"topk must be in \[1, V=17\]",
    "options_differ": r"topk/clamp_p must be the same on every rank",
    "verl_label": r"targets must be global ids in \[0, 17\) \(the shards.*found -100",
}


def test_bad_input_raises_on_every_rank(tmp_path):
    import re

    world = 3
    results = run_ranks(_bad_worker, world, tmp_path, timeout_s=60)
    x, w, b, y, a = _head(torch.float64, "topk3")
    want = linear_logprobs(x, w, y, bias=b, topk=3).clamped_entropy
    for rank, res in enumerate(results):
        for name, pattern in BAD_MESSAGES.items():
            kind, msg = res[name]
            assert kind == "ValueError" and re.search(pattern, msg), f"rank {rank}, {name}: {kind}: {msg}"
        # a bad value on one rank: that rank raises its own error, the others say which rank failed
        kind, msg = res["dtype_one_rank"]
        if rank == 0:
            assert kind == "TypeError" and "bias dtype torch.float64 does not match hidden dtype torch.float32" in msg
        else:
            assert kind == "ValueError" and "rank(s) [0] of process_group rejected their inputs" in msg
        kind, msg = res["verl_shape"]
        if rank == 1:
            assert kind == "ValueError" and "labels must hold one id per token of hidden (12 tokens" in msg
        else:
            assert kind == "ValueError" and "rank(s) [1] of process_group rejected their inputs" in msg
        for name in [n for n in res if n.endswith("/after")]:
            torch.testing.assert_close(res[name], want, rtol=1e-10, atol=1e-12)


def test_process_group_without_init_is_a_local_error():
    x, w, b, y, a = _head(torch.float32, "logp_entropy")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        linear_logprobs(x, w, y, process_group=object())
    with pytest.raises(ValueError, match="vocab_size=18 but weight has V=17"):
        linear_logprobs(x, w, y, vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="hidden_grad must be one of"):
        linear_logprobs(x, w, y, hidden_grad="half")
    with pytest.raises(ValueError, match=r"targets must be in \[0, 17\) \(ignore_index=None"):
        linear_logprobs(x, w, y, ignore_index=None)


# --- data parallelism: statistics over the ranks of dp_group --------------------------------------

Q = 0.3
SEQ = 6
# 3 ranks, two data-parallel groups: ranks 0 and 1 (different token counts) and rank 2 alone.
DP_GROUPS = ([0, 1], [2])
COV_KW = dict(clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, kl_cov_ratio=0.2)


def _dp_batch(i):
    g = torch.Generator().manual_seed(40 + i)
    b = (2, 3, 2)[i]
    lp = -torch.rand(b, SEQ, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(b, SEQ, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, SEQ, generator=g) > (0.2, 0.6, 0.4)[i]
    ent = torch.rand(b, SEQ, generator=g, dtype=torch.float64) * 2
    return lp, old, adv, mask, ent


def _controller(group=None):
    from fused_entropy.control import AdaptiveEntropyCoef

    return AdaptiveEntropyCoef(target=0.9, delta=0.01, init=0.1, start_enabled=True, group=group)


def _loss_and_grad(lp, adv, mask, **kw):
    from fused_entropy import grpo_loss

    x = lp.clone().requires_grad_()
    loss, _ = grpo_loss(x, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad


DP_MODULE_CASES = {
    "module_8020": dict(loss_type="dapo", top_entropy_quantile=Q, beta=0.0),
    "module_dapo_single_pass": dict(loss_type="dapo", beta=0.0, single_pass=True),
}


def _dp_head(i):
    g = torch.Generator().manual_seed(60 + i)
    b = (2, 3, 2)[i]
    x = torch.randn(b, SEQ, H, generator=g, dtype=torch.float64)
    w = torch.randn(VOCAB, H, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # replicated
    ids = torch.randint(0, VOCAB, (b, SEQ), generator=g)
    mask = torch.rand(b, SEQ, generator=g) > (0.2, 0.6, 0.4)[i]
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    old = -torch.rand(b, SEQ, generator=g, dtype=torch.float64) * 3
    return x, w, ids, mask, adv, old


def _dp_module_loss(head, **kw):
    from fused_entropy import LinearGRPOLoss

    x, w, ids, mask, adv, old = head
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = LinearGRPOLoss(**kw)(x, w, ids, mask, adv, old_per_token_logps=old)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _dp_worker(rank, world):
    from fused_entropy import grpo_normalizers

    groups = [dist.new_group(r) for r in DP_GROUPS]
    dp = groups[0] if rank in DP_GROUPS[0] else groups[1]
    lp, old, adv, mask, ent = _dp_batch(rank)
    res = {}
    norms = grpo_normalizers(mask, loss_type="dapo", top_entropy_quantile=Q, entropy=ent, dtype=torch.float64,
                             dp_group=dp)
    res["threshold"], res["policy_denom"] = norms.entropy_threshold, norms.policy_denom
    ctrl = _controller(dp)
    res["dapo"] = _loss_and_grad(lp, adv, mask, old_logprobs=old, entropy=ent, loss_type="dapo",
                                 top_entropy_quantile=Q, entropy_controller=ctrl, dp_group=dp)
    res["mean"], res["coef"] = ctrl.step(), ctrl.coef
    for lt in ("clip_cov", "kl_cov"):
        gen = torch.Generator().manual_seed(3)
        res[lt] = _loss_and_grad(lp, adv, mask, old_logprobs=old, loss_type=lt, generator=gen, dp_group=dp,
                                 cov_statistics="global", **COV_KW)
    # LinearGRPOLoss: the 80/20 threshold (two passes) and the DAPO count (single pass) over dp_group
    for name, kw in DP_MODULE_CASES.items():
        res[name] = _dp_module_loss(_dp_head(rank), dp_group=dp, **kw)
    # local statistics stay local (verl): this rank's micro-batch alone
    res["kl_cov_local"] = _loss_and_grad(lp, adv, mask, old_logprobs=old, loss_type="kl_cov", dp_group=dp,
                                           cov_statistics="local", **COV_KW)
    return res


def test_data_parallel_statistics_equal_one_process(tmp_path):
    from fused_entropy import GRPONormalizers, grpo_normalizers

    results = run_ranks(_dp_worker, 3, tmp_path)
    for members in DP_GROUPS:
        batches = [_dp_batch(r) for r in members]
        lp, old, adv, mask, ent = (torch.cat(parts) for parts in zip(*batches))
        n_all = int(mask.sum())
        world = len(members)
        one = grpo_normalizers(mask, loss_type="dapo", top_entropy_quantile=Q, entropy=ent, dtype=torch.float64)
        thr = torch.quantile(ent[mask], 1 - Q)
        torch.testing.assert_close(one.entropy_threshold, thr, rtol=1e-12, atol=0)
        ctrl = _controller()
        _loss_and_grad(lp, adv, mask, old_logprobs=old, entropy=ent, loss_type="dapo", top_entropy_quantile=Q,
                       entropy_controller=ctrl)
        mean, coef = ctrl.step(), ctrl.coef
        cov_ref = {}
        for lt in ("clip_cov", "kl_cov"):
            cov_ref[lt] = _loss_and_grad(lp, adv, mask, old_logprobs=old, loss_type=lt,
                                         generator=torch.Generator().manual_seed(3), **COV_KW)
        row0 = 0
        for r, (b_lp, b_old, b_adv, b_mask, b_ent) in zip(members, batches):
            got = results[r]
            rows = slice(row0, row0 + b_lp.shape[0])
            row0 += b_lp.shape[0]
            # the quantile and the DAPO count are those of all the group's tokens
            assert got["threshold"].item() == pytest.approx(thr.item(), rel=1e-12)
            assert got["policy_denom"].item() == pytest.approx(n_all / world, rel=1e-12)
            # the rank's loss is its share of the group's batch (DAPO over n_all / world), threshold global
            m_eff = (b_ent >= thr) & b_mask
            norms = GRPONormalizers(torch.tensor(n_all / world, dtype=torch.float64),
                                    torch.tensor(max(int(b_mask.sum()), 1), dtype=torch.float64),
                                    torch.tensor(max(int(m_eff.sum()), 1), dtype=torch.float64), thr)
            want = _loss_and_grad(b_lp, b_adv, b_mask, old_logprobs=b_old, entropy=b_ent, loss_type="dapo",
                                  top_entropy_quantile=Q, entropy_coef=0.1, normalizers=norms)
            for g, w_ in zip(got["dapo"], want):
                torch.testing.assert_close(g, w_, rtol=1e-12, atol=1e-14)
            # the controller's window mean and coefficient are those of one process over all tokens
            assert got["mean"] == pytest.approx(mean, rel=1e-12) and got["coef"] == pytest.approx(coef, rel=1e-12)
            # global Clip-Cov / KL-Cov: same selection, so each rank's gradient is `world` times one process's
            for lt in ("clip_cov", "kl_cov"):
                loss, grad = got[lt]
                torch.testing.assert_close(grad, world * cov_ref[lt][1][rows], rtol=1e-12, atol=1e-14)
            if world > 1:  # the selections differ from local ones, so the test above could fail
                local = _loss_and_grad(b_lp, b_adv, b_mask, old_logprobs=b_old, loss_type="kl_cov",
                                       num_items_in_batch=n_all / world, **COV_KW)
                torch.testing.assert_close(got["kl_cov_local"][1], local[1], rtol=1e-12, atol=1e-14)
                assert not torch.allclose(got["kl_cov"][1], got["kl_cov_local"][1])
        # LinearGRPOLoss on each rank's tokens: the ranks' mean loss and weight gradient (what data
        # parallelism averages) are one process's over all the group's tokens
        heads = [_dp_head(r) for r in members]
        cat_head = tuple(torch.cat(parts) if i != 1 else parts[0] for i, parts in enumerate(zip(*heads)))
        for name, kw in DP_MODULE_CASES.items():
            loss, gx, gw = _dp_module_loss(cat_head, **kw)
            got = [results[r][name] for r in members]
            assert sum(g[0] for g in got).item() / world == pytest.approx(loss.item(), rel=1e-12)
            torch.testing.assert_close(sum(g[2] for g in got) / world, gw, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(torch.cat([g[1] for g in got]) / world, gx, rtol=1e-10, atol=1e-13)
        if world > 1:
            assert sum(results[r]["clip_cov"][0] for r in members) / world == pytest.approx(
                cov_ref["clip_cov"][0].item(), rel=1e-12)
