"""Numerics and input robustness (issue 13): odd inputs get the right value or a clear error.

Each test names the item of the issue it covers. Both backends where both apply (the ``backend``
fixture: ``"torch"`` and ``"triton"``, CUDA or CPU under ``TRITON_INTERPRET=1``). Shapes are tiny.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICE
from fused_entropy import LinearGRPOLoss, grpo_loss, linear_logprobs, logprobs_from_logits
from fused_entropy.reference import grpo as ref_grpo

TOKEN_NORMALIZED = ("dapo", "cispo", "vespo")
B, T, H, VOCAB = 4, 5, 8, 11


def _head_batch(seed=0, dtype=torch.float32, bsz=B, seqlen=T, hidden=H, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, seqlen, hidden, generator=g, dtype=dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype)
    ids = torch.randint(0, vocab, (bsz, seqlen), generator=g)
    mask = torch.ones(bsz, seqlen)
    for b in range(bsz):
        mask[b, seqlen - b % seqlen:] = 0  # rows of T, T-1, T-2, ... valid tokens
    adv = torch.randn(bsz, generator=g, dtype=dtype)
    old = -torch.rand(bsz, seqlen, generator=g, dtype=dtype) * 3
    return x.to(DEVICE), w.to(DEVICE), ids.to(DEVICE), mask.to(DEVICE), adv.to(DEVICE), old.to(DEVICE)


def _tok_batch(seed=0, bsz=B, seqlen=T, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(bsz, seqlen, generator=g, dtype=dtype) * 3
    old = lp + 0.3 * torch.randn(bsz, seqlen, generator=g, dtype=dtype)
    adv = torch.randn(bsz, generator=g, dtype=dtype)
    ent = torch.rand(bsz, seqlen, generator=g, dtype=dtype) * 2
    mask = torch.rand(bsz, seqlen, generator=g) > 0.3
    mask[:, 0] = True
    return lp, old, adv, ent, mask


# ---------------------------------------------------------------------------------------------
# item 2: the entropy bonus is window-exact under gradient accumulation with num_items_in_batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", TOKEN_NORMALIZED)
def test_item2_bonus_window_exact_grpo_loss(loss_type, backend):
    lp, old, adv, ent, mask = _tok_batch(bsz=8)
    n_items = int(mask.sum())
    kw = dict(loss_type=loss_type, entropy_coef=0.1, backend=backend)
    whole, _ = grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, **kw)
    whole_items, _ = grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, num_items_in_batch=n_items, **kw)
    parts = sum(
        grpo_loss(lp[i:i + 2], adv[i:i + 2], mask[i:i + 2], old_logprobs=old[i:i + 2], entropy=ent[i:i + 2],
                  num_items_in_batch=torch.tensor(float(n_items)), **kw)[0]
        for i in range(0, 8, 2)
    )
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole_items, whole, rtol=1e-12, atol=1e-12)
    bonus_only = -0.1 * (ent * mask).sum() / n_items
    no_bonus = sum(grpo_loss(lp[i:i + 2], adv[i:i + 2], mask[i:i + 2], old_logprobs=old[i:i + 2],
                             num_items_in_batch=n_items, loss_type=loss_type, backend=backend)[0] for i in range(0, 8, 2))
    torch.testing.assert_close(parts - no_bonus, bonus_only, rtol=1e-12, atol=1e-12)
    # the reference (MATH.md section 5 with the same rule) agrees
    r, _ = ref_grpo.grpo_loss(lp[:2], adv[:2], mask[:2], old_logprobs=old[:2], entropy=ent[:2],
                              num_items_in_batch=n_items, loss_type=loss_type, entropy_coef=0.1)
    got, _ = grpo_loss(lp[:2], adv[:2], mask[:2], old_logprobs=old[:2], entropy=ent[:2], num_items_in_batch=n_items, **kw)
    torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "sapo"])
def test_item2_other_loss_types_keep_the_micro_batch_mean(loss_type):
    lp, old, adv, ent, mask = _tok_batch()
    a, _ = grpo_loss(lp, adv, mask, entropy=ent, entropy_coef=0.1, loss_type=loss_type, num_items_in_batch=99)
    b, _ = grpo_loss(lp, adv, mask, entropy=ent, loss_type=loss_type, num_items_in_batch=99)
    torch.testing.assert_close(a - b, -0.1 * (ent * mask).sum() / mask.sum(), rtol=1e-12, atol=1e-12)


def test_item2_bonus_normalization_mean_keeps_trl_semantics():
    lp, old, adv, ent, mask = _tok_batch()
    a, _ = grpo_loss(lp, adv, mask, entropy=ent, entropy_coef=0.1, num_items_in_batch=99, bonus_normalization="mean")
    b, _ = grpo_loss(lp, adv, mask, entropy=ent, num_items_in_batch=99)
    torch.testing.assert_close(a - b, -0.1 * (ent * mask).sum() / mask.sum(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="bonus_normalization"):
        grpo_loss(lp, adv, mask, entropy=ent, bonus_normalization="window")


@pytest.mark.parametrize("single_pass", [False, None])
@pytest.mark.parametrize("loss_type", TOKEN_NORMALIZED)
def test_item2_bonus_window_exact_linear_grpo(loss_type, single_pass):
    x, w, ids, mask, adv, old = _head_batch(dtype=torch.float64)
    n_items = int(mask.sum())
    mod = LinearGRPOLoss(beta=0.0, loss_type=loss_type, entropy_coef=0.1, single_pass=single_pass, backend="torch")
    whole, _ = mod(x, w, ids, mask, adv, old_per_token_logps=old)
    parts = sum(mod(x[i:i + 1], w, ids[i:i + 1], mask[i:i + 1], adv[i:i + 1], old_per_token_logps=old[i:i + 1],
                    num_items_in_batch=torch.tensor(n_items))[0] for i in range(B))
    torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# item 14: top_entropy_quantile = 0 keeps only the highest-entropy token (stock TRL)
# ---------------------------------------------------------------------------------------------


def test_item14_quantile_zero_keeps_the_highest_entropy_token(backend):
    lp, old, adv, ent, mask = _tok_batch()
    top = ent.masked_fill(~mask, -1).argmax()
    only = torch.zeros_like(mask).reshape(-1)
    only[top] = True
    only = only.reshape(mask.shape)
    got, _ = grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, top_entropy_quantile=0.0, entropy_coef=0.1,
                       backend=backend)
    # the policy term of the single kept token (normalized by all valid tokens), bonus its entropy alone
    pol, _ = grpo_loss(lp, adv, mask, old_logprobs=old, is_ratio=only.to(lp.dtype), backend=backend)
    torch.testing.assert_close(got, pol - 0.1 * ent.reshape(-1)[top], rtol=1e-12, atol=1e-12)
    r, _ = ref_grpo.grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, top_entropy_quantile=0.0, entropy_coef=0.1)
    torch.testing.assert_close(got, r, rtol=1e-10, atol=1e-12)


def test_item14_quantile_zero_in_the_module():
    x, w, ids, mask, adv, old = _head_batch(dtype=torch.float64)
    mod = LinearGRPOLoss(beta=0.0, top_entropy_quantile=0.0, entropy_coef=0.1, backend="torch")
    loss, _ = mod(x, w, ids, mask, adv, old_per_token_logps=old)
    assert torch.isfinite(loss)
    for q in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_entropy_quantile"):
            LinearGRPOLoss(top_entropy_quantile=q)


# ---------------------------------------------------------------------------------------------
# item 11: luspo with id -100 (or any non-vocabulary id) at masked positions equals Liger
# ---------------------------------------------------------------------------------------------


def _liger_luspo(x, w, ids, mask, adv, **kw):
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    beta = kw.pop("beta")
    m = liger.LigerFusedLinearGRPOLoss(beta=beta, loss_type="luspo", compiled=False,
                                       use_ref_model=beta != 0.0, importance_sampling_level=kw.pop("level"))
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, metrics = m(xx, ww, ids, mask, adv, **kw)
    loss.backward()
    return loss.detach(), metrics, xx.grad, ww.grad


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("old", [False, True], ids=["no_old", "old"])
@pytest.mark.parametrize("ref", ["none", "model"])
def test_item11_luspo_masked_padding_ids_equal_liger(backend, level, old, ref):
    x, w, ids, mask, adv, old_lp = _head_batch(seed=3)
    x, w, ids, mask, adv, old_lp = (t.cpu() for t in (x, w, ids, mask, adv, old_lp))
    ids = ids.masked_fill(mask == 0, -100)
    ids[1, -1] = VOCAB + 2  # any id outside [0, V) at a masked position: Liger gives it no target logit
    g = torch.Generator().manual_seed(5)
    kw = dict(old_per_token_logps=old_lp if old else None)
    beta = 0.0
    if ref == "model":
        beta = 0.04
        kw.update(ref_input=x + 0.1 * torch.randn(x.shape, generator=g), ref_weight=w + 0.05 * torch.randn(w.shape, generator=g))
    want_loss, want_m, want_gx, want_gw = _liger_luspo(x, w, ids, mask, adv, beta=beta, level=level, **kw)
    mod = LinearGRPOLoss(beta=beta, loss_type="luspo", importance_sampling_level=level, backend=backend)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    xx, ww = dev(x).requires_grad_(True), dev(w).requires_grad_(True)
    loss, metrics = mod(xx, ww, dev(ids), dev(mask), dev(adv), **{k: dev(v) for k, v in kw.items()})
    loss.backward()
    assert mod.last_path == "two"  # rows with no target logit take the two-pass path
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(metrics, want_m):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    for got, want in ((xx.grad, want_gx), (ww.grad, want_gw)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# item 3: masks hold 0 and 1 (bool, integer or floating); weights and NaN are rejected by name
# ---------------------------------------------------------------------------------------------

BAD_MASK_VALUES = [0.5, 2.0, -1.0, float("nan")]


@pytest.mark.parametrize("value", BAD_MASK_VALUES, ids=str)
def test_item3_grpo_loss_rejects_non_binary_mask(value, backend):
    lp, old, adv, ent, mask = _tok_batch()
    m = mask.double()
    m[0, 0] = value
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*found"):
        grpo_loss(lp, adv, m, backend=backend)
    from fused_entropy import grpo_normalizers

    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1"):
        grpo_normalizers(m)


def test_item3_binary_masks_of_every_dtype_agree(backend):
    lp, old, adv, ent, mask = _tok_batch()
    want, _ = grpo_loss(lp, adv, mask, old_logprobs=old, backend=backend)
    for dt in (torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64):
        got, _ = grpo_loss(lp, adv, mask.to(dt), old_logprobs=old, backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("value", BAD_MASK_VALUES, ids=str)
def test_item3_linear_grpo_rejects_non_binary_attention_mask(value, backend):
    x, w, ids, mask, adv, old = _head_batch()
    mask[1, 1] = value
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1"):
        LinearGRPOLoss(beta=0.0, backend=backend)(x, w, ids, mask, adv)


def test_item3_trl_head_rejects_non_binary_attention_mask():
    pytest.importorskip("trl")
    from _tiny_model import make_model
    from fused_entropy.integrations.trl import HeadRequest, install_fused_head

    model = make_model()
    install_fused_head(model, temperature=1.0, backend="torch")
    ids = torch.randint(4, 64, (2, 6))
    am = torch.ones(2, 6)
    out = model(input_ids=ids, attention_mask=am, fused_entropy=HeadRequest(3, entropy=True))
    assert out.logprobs.shape == (2, 3)
    am[0, 5] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1"):
        model(input_ids=ids, attention_mask=am, fused_entropy=HeadRequest(3))


def test_item10_complex_attention_mask_is_named():
    x, w, ids, mask, adv, old = _head_batch()
    with pytest.raises(TypeError, match="attention_mask must be a bool, integer or floating"):
        LinearGRPOLoss(beta=0.0)(x, w, ids, mask.to(torch.complex64), adv)
    lp, old, adv, ent, mask = _tok_batch()
    with pytest.raises(TypeError, match="^mask must be a bool, integer or floating"):
        grpo_loss(lp, adv, mask.to(torch.complex64))


# ---------------------------------------------------------------------------------------------
# item 4: every integer dtype that holds the ids; ranges compared in int64
# ---------------------------------------------------------------------------------------------

INT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64, torch.uint64]
# (dtype, V): a vocabulary larger than the dtype's range, the case the old check got wrong
WIDE_V = {torch.int8: 200, torch.uint8: 300, torch.int16: 32768, torch.uint16: 70000}


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_item4_every_integer_target_dtype(dtype, backend):
    # the range check is the same code for both backends; the interpreter only needs a small V
    vocab = WIDE_V.get(dtype, 300) if backend == "torch" else 300
    hi = min(vocab, int(torch.iinfo(dtype).max) + 1) if dtype != torch.uint64 else vocab
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, min(hi, 127), (3,), generator=g)
    z = torch.randn(3, vocab, generator=g, dtype=torch.float64).to(DEVICE)
    want = logprobs_from_logits(z, y.to(DEVICE), backend=backend)
    got = logprobs_from_logits(z, y.to(dtype).to(DEVICE), backend=backend)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE)
    w = torch.randn(vocab, 4, generator=g, dtype=torch.float64).to(DEVICE)
    want = linear_logprobs(h, w, y.to(DEVICE), backend=backend, entropy=False)
    got = linear_logprobs(h, w, y.to(dtype).to(DEVICE), backend=backend, entropy=False)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)


def test_item4_out_of_range_ids_are_reported_with_their_value():
    z = torch.randn(2, 200)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 100\) or equal ignore_index=-100; found 120"):
        logprobs_from_logits(z[:, :100], torch.tensor([1, 120], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"found -3"):
        logprobs_from_logits(z, torch.tensor([1, -3], dtype=torch.int8))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        logprobs_from_logits(z, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        logprobs_from_logits(z, torch.tensor([True, False]))


def test_item4_module_and_verl_accept_narrow_ids():
    x, w, ids, mask, adv, old = _head_batch()
    mod = LinearGRPOLoss(beta=0.0, backend="torch")
    want, _ = mod(x, w, ids, mask, adv)
    got, _ = mod(x, w, ids.to(torch.uint8), mask, adv)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    from fused_entropy.integrations.verl import linear_cross_entropy

    h, w2, y = x.reshape(-1, H), w, torch.tensor([3, 7, 10], device=DEVICE)
    want = linear_cross_entropy(h[:3], w2, y)
    got = linear_cross_entropy(h[:3], w2, y.to(torch.int8))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*found 12"):
        linear_cross_entropy(h[:3], w2, torch.tensor([3, 12, 1], dtype=torch.uint8, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# item 7: ignore_index is an int or None in both entry points; anything else is named
# ---------------------------------------------------------------------------------------------


def test_item7_ignore_index_none_in_logprobs_from_logits(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 9, generator=g, dtype=torch.float64).to(DEVICE)
    y = torch.tensor([0, 3, 8, 5], device=DEVICE)
    got = logprobs_from_logits(z, y, ignore_index=None, backend=backend)
    torch.testing.assert_close(got.logprobs, torch.log_softmax(z, -1).gather(-1, y[:, None])[:, 0])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 9\) \(ignore_index=None: no row is skipped\); found -100"):
        logprobs_from_logits(z, torch.tensor([0, -100, 1, 2], device=DEVICE), ignore_index=None, backend=backend)


@pytest.mark.parametrize("value", ["a", -100.5, -100.0, True, 1 << 64], ids=repr)
def test_item7_bad_ignore_index_is_named(value):
    z, y = torch.randn(2, 5), torch.tensor([1, 2])
    exc = ValueError if isinstance(value, int) and not isinstance(value, bool) else TypeError
    for fn in (lambda: logprobs_from_logits(z, y, ignore_index=value),
               lambda: linear_logprobs(torch.randn(2, 3), torch.randn(5, 3), y, ignore_index=value)):
        with pytest.raises(exc, match="ignore_index must"):
            fn()


# ---------------------------------------------------------------------------------------------
# item 5: NaN/inf advantages outside the mask never reach the loss or a gradient
# ---------------------------------------------------------------------------------------------

ADV_CASES = [(lt, lvl) for lt in ("grpo", "dapo", "luspo", "cispo", "sapo", "vespo", "clip_cov", "kl_cov")
             for lvl in ("token", "sequence") if not (lvl == "sequence" and lt in ("cispo", "sapo", "vespo", "clip_cov", "kl_cov"))]


@pytest.mark.parametrize("loss_type,level", ADV_CASES, ids=[f"{a}-{b}" for a, b in ADV_CASES])
def test_item5_nonfinite_advantages_outside_the_mask(loss_type, level, backend):
    lp, old, adv, ent, mask = _tok_batch(seed=2)
    adv_bt = adv[:, None].expand_as(lp).clone()
    mask[3] = False  # a row with no valid token: its [B] advantage may be NaN too
    clean_bt = torch.where(mask, adv_bt, torch.zeros_like(adv_bt))
    dirty_bt = adv_bt.clone()
    dirty_bt[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=lp.dtype).repeat(int((~mask).sum()))[: int((~mask).sum())]
    dirty_b = adv.clone()
    dirty_b[3] = float("nan")
    clean_b = adv.clone()
    clean_b[3] = 0.0
    kw = dict(loss_type=loss_type, importance_sampling_level=level, old_logprobs=old, entropy=ent, entropy_coef=0.05,
              backend=backend, generator=None)
    for clean, dirty in ((clean_bt, dirty_bt), (clean_b, dirty_b)):
        results = []
        for a in (clean, dirty):
            x = lp.clone().requires_grad_(True)
            kw["generator"] = torch.Generator().manual_seed(0)
            loss, metrics = grpo_loss(x, a, mask, **kw)
            (g,) = torch.autograd.grad(loss, x)
            results.append((loss, g, metrics))
        (l0, g0, m0), (l1, g1, m1) = results
        assert torch.isfinite(l1) and torch.isfinite(g1).all()
        torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)
        for k in m0:
            torch.testing.assert_close(m1[k], m0[k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_item5_linear_grpo_nonfinite_advantages_outside_the_mask(level):
    x, w, ids, mask, adv, old = _head_batch(dtype=torch.float64)
    adv_bt = adv[:, None].expand(B, T).clone()
    dirty = adv_bt.masked_fill(mask == 0, float("nan"))
    mod = LinearGRPOLoss(beta=0.0, importance_sampling_level=level, backend="torch")
    outs = []
    for a in (adv_bt, dirty):
        xx = x.clone().requires_grad_(True)
        loss, _ = mod(xx, w, ids, mask, a, old_per_token_logps=old)
        loss.backward()
        outs.append((loss, xx.grad))
    assert torch.isfinite(outs[1][0]) and torch.isfinite(outs[1][1]).all()
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])


# ---------------------------------------------------------------------------------------------
# item 6: num_items_in_batch as a tensor follows the rules of the Python number
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), -4.0, -1, float("inf")], ids=repr)
@pytest.mark.parametrize("form", ["python", "tensor"])
def test_item6_bad_num_items_rejected_in_both_forms(value, form):
    lp, old, adv, ent, mask = _tok_batch()
    n = torch.tensor(value) if form == "tensor" else value
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        grpo_loss(lp, adv, mask, num_items_in_batch=n)
    from fused_entropy import grpo_normalizers

    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        grpo_normalizers(mask, num_items_in_batch=n)
    x, w, ids, m2, adv2, _ = _head_batch()
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        LinearGRPOLoss(beta=0.0, backend="torch")(x, w, ids, m2, adv2, num_items_in_batch=n)


def test_item6_good_num_items_equal_in_both_forms():
    lp, old, adv, ent, mask = _tok_batch()
    a, _ = grpo_loss(lp, adv, mask, num_items_in_batch=7)
    b, _ = grpo_loss(lp, adv, mask, num_items_in_batch=torch.tensor(7))
    c, _ = grpo_loss(lp, adv, mask, num_items_in_batch=torch.tensor([7.0]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(TypeError, match="num_items_in_batch"):
        grpo_loss(lp, adv, mask, num_items_in_batch=torch.tensor(True))
    with pytest.raises(TypeError, match="num_items_in_batch"):
        grpo_loss(lp, adv, mask, num_items_in_batch=True)


# ---------------------------------------------------------------------------------------------
# item 9: scalars outside the ranges that compute finitely are rejected; the edges compute finitely
# ---------------------------------------------------------------------------------------------

BAD_TRANSFORMS = [
    (dict(temperature=1e-39), "temperature must be in"),
    (dict(temperature=1e-300), "temperature must be in"),
    (dict(temperature=1e31), "temperature must be in"),
    (dict(logit_scale=1e39), "logit_scale must be 0 or have"),
    (dict(logit_scale=-1e39), "logit_scale must be 0 or have"),
    (dict(logit_scale=1e300), "logit_scale must be 0 or have"),
    (dict(logit_scale=1e-39), "logit_scale must be 0 or have"),
    (dict(softcap=1e-39), "softcap must be in"),
    (dict(logit_scale=1e20, temperature=1e-20), r"\|logit_scale\| / temperature must be"),
]
EDGE_TRANSFORMS = [
    dict(temperature=1e-30), dict(temperature=1e30), dict(logit_scale=1e30), dict(logit_scale=-1e30),
    dict(logit_scale=1e-30), dict(logit_scale=0.0), dict(softcap=1e-30), dict(softcap=1e30),
    dict(temperature=1e-30, softcap=1e-30), dict(logit_scale=1e15, temperature=1e-15),
]


@pytest.mark.parametrize("kw,match", BAD_TRANSFORMS, ids=[str(k) for k, _ in BAD_TRANSFORMS])
def test_item9_out_of_range_transform_is_rejected(kw, match):
    h, w, y = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=match):
        linear_logprobs(h, w, y, **kw)
    with pytest.raises(ValueError, match=match):
        LinearGRPOLoss(**kw)
    if set(kw) == {"temperature"}:
        with pytest.raises(ValueError, match=match):
            logprobs_from_logits(torch.randn(2, 5), y, **kw)
        from fused_entropy.integrations.verl import linear_cross_entropy

        with pytest.raises(ValueError, match=match):
            linear_cross_entropy(h, w, y, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kw", EDGE_TRANSFORMS, ids=str)
def test_item9_edges_of_the_ranges_compute_finitely(kw, dtype, backend):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 8, generator=g, dtype=dtype).to(DEVICE).requires_grad_(True)
    w = (torch.randn(7, 8, generator=g, dtype=dtype) * 0.5).to(DEVICE).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 6], device=DEVICE)
    st = linear_logprobs(h, w, y, topk=3, backend=backend, **kw)
    (st.logprobs.sum() + st.entropy.sum() + st.clamped_entropy.sum()).backward()
    for t in (st.logprobs, st.entropy, st.clamped_entropy, h.grad, w.grad):
        assert torch.isfinite(t).all()


BAD_OPTIONS = [
    (dict(loss_type="sapo", sapo_temperature_pos=1e-39), "sapo_temperature_pos must be >= 1e-30"),
    (dict(loss_type="sapo", sapo_temperature_neg=1e-300), "sapo_temperature_neg must be >= 1e-30"),
    (dict(loss_type="sapo", sapo_temperature_pos=1e39), r"\|sapo_temperature_pos\| <= 1e\+30"),
    (dict(loss_type="vespo", vespo_lambda_pos=1e39), "vespo_lambda_pos"),
    (dict(loss_type="vespo", vespo_k_pos=-1e39), "vespo_k_pos"),
    (dict(epsilon_high=1e39), "epsilon_high"),
    (dict(delta=1e-300), "delta must be >= 1e-30"),
    (dict(beta=1e39), "beta"),
    (dict(entropy_coef=-1e39), "entropy_coef"),
]


@pytest.mark.parametrize("kw,match", BAD_OPTIONS, ids=[str(k) for k, _ in BAD_OPTIONS])
def test_item9_out_of_range_loss_options_are_rejected(kw, match):
    lp, old, adv, ent, mask = _tok_batch()
    with pytest.raises(ValueError, match=match):
        grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=old, entropy=ent, **kw)
    with pytest.raises(ValueError, match=match):
        LinearGRPOLoss(**kw)


# ---------------------------------------------------------------------------------------------
# item 10: errors name the argument at fault
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [-5, 5])
def test_item10_reference_head_of_another_vocabulary_names_ref_weight(rows):
    x, w, ids, mask, adv, old = _head_batch()
    ref_w = torch.randn(VOCAB + rows, H, device=DEVICE)
    mod = LinearGRPOLoss(beta=0.04, use_ref_model=True, backend="torch")
    with pytest.raises(ValueError, match=rf"ref_weight must have shape \[V, H'\]=\({VOCAB}, {H}\).*got \({VOCAB + rows}, {H}\)"):
        mod(x, w, ids, mask, adv, ref_input=x, ref_weight=ref_w)
    with pytest.raises(ValueError, match="ref_bias must have shape"):
        mod(x, w, ids, mask, adv, ref_input=x, ref_weight=w, ref_bias=torch.zeros(VOCAB + 1, device=DEVICE))


class _Ctrl:
    def __init__(self, coef):
        self.coef = coef

    def observe(self, entropy_sum, token_count):
        pass


@pytest.mark.parametrize("coef", ["x", float("nan"), None], ids=repr)
def test_item10_bad_controller_coefficient_is_named(coef):
    x, w, ids, mask, adv, old = _head_batch()
    exc = ValueError if isinstance(coef, float) else TypeError
    with pytest.raises(exc, match="entropy_controller.coef must be"):
        LinearGRPOLoss(beta=0.0, entropy_controller=_Ctrl(coef), backend="torch")(x, w, ids, mask, adv)
    lp, _, a, ent, m = _tok_batch()
    with pytest.raises(exc, match="entropy_controller.coef must be"):
        grpo_loss(lp, a, m, entropy=ent, entropy_controller=_Ctrl(coef))
    from fused_entropy.control import StaticEntropyCoef

    with pytest.raises(exc, match="coef must be"):
        StaticEntropyCoef(coef)


def test_item10_nonfinite_controller_state_is_rejected_and_leaves_the_state():
    from fused_entropy.control import AdaptiveEntropyCoef, StaticEntropyCoef

    c = AdaptiveEntropyCoef(init=0.01)
    good = c.state_dict()
    for key, value in (("value", float("nan")), ("last_entropy", float("inf")), ("window_entropy_sum", "x"),
                       ("window_token_count", -1.0), ("num_steps", -2), ("num_steps", 1.5)):
        bad = dict(good, **{key: value})
        with pytest.raises((ValueError, TypeError), match=key):
            c.load_state_dict(bad)
        assert c.state_dict() == good
    s = StaticEntropyCoef(0.1)
    with pytest.raises(ValueError, match="last_entropy"):
        s.load_state_dict(dict(s.state_dict(), last_entropy=float("nan")))


@pytest.mark.parametrize("value", ["no", 1, None], ids=repr)
def test_item10_entropy_flag_must_be_a_bool(value):
    h, w, y = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="entropy must be a bool"):
        linear_logprobs(h, w, y, entropy=value)
    with pytest.raises(TypeError, match="entropy must be a bool"):
        logprobs_from_logits(torch.randn(2, 5), y, entropy=value)


# ---------------------------------------------------------------------------------------------
# item 8: double backward raises torch's clear once_differentiable error
# ---------------------------------------------------------------------------------------------


def _second_backward(make_loss, leaf):
    (g,) = torch.autograd.grad(make_loss(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only.*once_differentiable"):
        g.pow(2).sum().backward()


def test_item8_double_backward_is_a_clear_error(backend):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8, generator=g).to(DEVICE).requires_grad_(True)
    w = torch.randn(6, 8, generator=g).to(DEVICE)
    y = torch.tensor([0, 1, 2, 5], device=DEVICE)
    _second_backward(lambda: linear_logprobs(h, w, y, backend=backend).logprobs.sum(), h)
    z = torch.randn(4, 6, generator=g).to(DEVICE).requires_grad_(True)
    _second_backward(lambda: logprobs_from_logits(z, y, topk=2, backend=backend).clamped_entropy.sum(), z)
    lp, old, adv, ent, mask = _tok_batch()
    lp = lp.to(DEVICE).requires_grad_(True)
    if backend == "triton":  # the objective kernel's Function
        _second_backward(lambda: grpo_loss(lp, adv.to(DEVICE), mask.to(DEVICE), backend=backend)[0], lp)
    x, w2, ids, m2, a2, _ = _head_batch()
    x.requires_grad_(True)
    mod = LinearGRPOLoss(beta=0.0, backend=backend, single_pass=True)
    _second_backward(lambda: mod(x, w2, ids, m2, a2)[0], x)


# ---------------------------------------------------------------------------------------------
# item 12: mixed precision (bf16 hidden, fp32 head), with and without torch.autocast
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
@pytest.mark.parametrize("single_pass", [False, None], ids=["two", "auto"])
def test_item12_bf16_hidden_fp32_head_runs_in_bf16(backend, autocast, single_pass):
    x, w, ids, mask, adv, old = _head_batch(seed=4)
    bias = torch.randn(VOCAB, device=DEVICE) * 0.1
    xb = x.bfloat16()

    def run(weight, b):
        xx = xb.clone().requires_grad_(True)
        ww, bb = weight.clone().requires_grad_(True), b.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = LinearGRPOLoss(beta=0.0, entropy_coef=0.05, backend=backend, single_pass=single_pass)(
                xx, ww, ids, mask, adv, bias=bb, old_per_token_logps=old)
        loss.backward()
        return loss, xx.grad, ww.grad, bb.grad

    loss, gx, gw, gb = run(w, bias)  # fp32 head
    want = run(w.bfloat16(), bias.bfloat16())  # the rule: the head runs in hidden's dtype
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gw.dtype == torch.float32 and gb.dtype == torch.float32
    torch.testing.assert_close(loss, want[0], rtol=0, atol=0)
    torch.testing.assert_close(gx, want[1], rtol=0, atol=0)
    torch.testing.assert_close(gw, want[2].float(), rtol=0, atol=0)
    st = linear_logprobs(xb.reshape(-1, H), w, ids.reshape(-1), bias=bias, backend=backend)
    st_b = linear_logprobs(xb.reshape(-1, H), w.bfloat16(), ids.reshape(-1), bias=bias.bfloat16(), backend=backend)
    torch.testing.assert_close(st.logprobs, st_b.logprobs, rtol=0, atol=0)


def test_item12_matches_liger_under_autocast():
    liger = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    x, w, ids, mask, adv, old = (t.cpu() for t in _head_batch(seed=6))
    xb = x.bfloat16()
    out = []
    for mod in (liger.LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False),
                LinearGRPOLoss(beta=0.0, backend="torch")):
        xx, ww = xb.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mod(xx, ww, ids, mask, adv, old_per_token_logps=old)
        loss.backward()
        out.append((loss.float(), xx.grad.float(), ww.grad.float()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_item12_other_dtype_mixtures_are_named():
    h, w, y = torch.randn(2, 3), torch.randn(5, 3), torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"weight dtype torch.float64 does not match hidden dtype torch.float32"):
        linear_logprobs(h, w.double(), y)
    with pytest.raises(TypeError, match=r"weight dtype torch.bfloat16 does not match hidden dtype torch.float16"):
        linear_logprobs(h.half(), w.bfloat16(), y)
    x, w2, ids, mask, adv, old = _head_batch()
    with pytest.raises(TypeError, match="lin_weight dtype torch.float64 does not match _input dtype"):
        LinearGRPOLoss(beta=0.0)(x, w2.double(), ids, mask, adv)


# ---------------------------------------------------------------------------------------------
# item 13: an FSDP2 (DTensor) LM head is gathered; its gradient goes back to the shards
# ---------------------------------------------------------------------------------------------

_DTENSOR_SCRIPT = r"""
import os, socket, torch, torch.distributed as dist
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh
from fused_entropy import LinearGRPOLoss, linear_logprobs
mesh = init_device_mesh("cpu", (1,))
g = torch.Generator().manual_seed(0)
w = torch.randn(11, 8, generator=g, dtype=torch.float64)
b = torch.randn(11, generator=g, dtype=torch.float64)
x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
ids = torch.randint(0, 11, (2, 3), generator=g)
mask, adv = torch.ones(2, 3), torch.tensor([1.0, -1.0], dtype=torch.float64)
def run(make, fn):
    wp, bp = make(w), make(b)
    out = fn(wp, bp)
    out.backward()
    grad = lambda p: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    return out.detach(), grad(wp), grad(bp)
plain = lambda t: torch.nn.Parameter(t.clone())
dt = lambda t: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)]))
fns = [lambda wp, bp: linear_logprobs(x.reshape(6, 8), wp, ids.reshape(6), bias=bp).logprobs.sum()]
fns += [lambda wp, bp, sp=sp: LinearGRPOLoss(beta=0.0, backend="torch", single_pass=sp)(x, wp, ids, mask, adv, bias=bp)[0]
        for sp in (False, None)]
for fn in fns:
    a, c = run(plain, fn), run(dt, fn)
    for u, v in zip(a, c):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
dist.destroy_process_group()
print("DTENSOR_OK")
"""


def test_item13_dtensor_head_is_gathered():
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.tensor")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    r = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT], capture_output=True, text=True, timeout=120)
    assert "DTENSOR_OK" in r.stdout, r.stderr[-3000:]
