"""grpo_loss against liger-kernel 0.8.5's loss math, the fp64 reference and bad input.

The torch path is checked in fp64 over every option; the Triton objective kernel
(kernels/objective.py) runs on CUDA, or on CPU with TRITON_INTERPRET=1 (how CI runs it), on shapes
kept small for the interpreter.
"""
import itertools

import pytest
import torch

from fused_entropy import grpo_loss, grpo_loss_and_grads, grpo_normalizers
from fused_entropy import reference
from fused_entropy import _launch_objective
from fused_entropy._grpo import quantile_threshold

from _inputs import grpo_inputs as _inputs
from conftest import DEVICE, TRITON_SKIP

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def _batch(b=4, t=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=dtype) * 2
    old = lp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    ref = lp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    adv = torch.randn(b, generator=g, dtype=dtype)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0] = False  # a fully padded row
    mask[1, 0] = True
    isr = torch.rand(b, t, generator=g, dtype=dtype) + 0.5
    ent = torch.rand(b, t, generator=g, dtype=dtype) * 3
    return lp, old, ref, adv, mask, isr, ent


LIGER_CASES = [
    c for c in itertools.product(LOSS_TYPES, ["token", "sequence"], [None, 1.3], [0.0, 0.04], [False, True])
    if not (c[1] == "sequence" and c[0] in ("cispo", "sapo", "vespo"))
]


@pytest.mark.parametrize("loss_type,level,delta,beta,with_is", LIGER_CASES,
                         ids=["-".join(map(str, c)) for c in LIGER_CASES])
def test_matches_liger_loss_math(loss_type, level, delta, beta, with_is):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    lp, old, ref, adv, mask, isr, _ = _batch()
    lp.requires_grad_(True)
    kw = dict(epsilon_low=0.2, epsilon_high=1.2 if loss_type == "cispo" else 0.28, beta=beta, loss_type=loss_type,
              max_completion_length=8, importance_sampling_level=level, delta=delta,
              use_bias_correction_kl=beta != 0.0)
    isr = isr if with_is else None
    m = mask.double()
    want, want_metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=lp, attention_mask=m, advantages=adv, full_attention_mask=m, ref_per_token_logps=ref,
        old_per_token_logps=old, vllm_is_ratio=isr, **kw)
    (want_grad,) = torch.autograd.grad(want, lp)
    got, metrics = grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref if beta else None, is_ratio=isr, **kw)
    (got_grad,) = torch.autograd.grad(got, lp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["clip_ratio/region_mean"], want_metrics[-1].double(), rtol=1e-12, atol=1e-12)
    if beta:
        torch.testing.assert_close(metrics["kl"], want_metrics[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES + ["luspo-trl"])
def test_chunks_with_global_normalizers_sum_to_batch(loss_type):
    lt, luspo_norm = ("luspo", "trl") if loss_type == "luspo-trl" else (loss_type, "liger")
    lp, old, ref, adv, mask, isr, ent = _batch(b=5, t=7, seed=1)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, loss_type=lt, max_completion_length=9,
              luspo_normalization=luspo_norm, entropy_coef=0.01, top_entropy_quantile=0.5)
    loss, metrics, g_lp, g_ent, _ = grpo_loss_and_grads(lp, adv, mask, entropy=ent, is_ratio=isr, **kw)
    norms = grpo_normalizers(mask, loss_type=lt, max_completion_length=9, luspo_normalization=luspo_norm,
                             top_entropy_quantile=0.5, entropy=ent, dtype=lp.dtype)
    parts = [slice(0, 2), slice(2, 3), slice(3, 5)]
    outs = [grpo_loss_and_grads(lp[s], adv[s], mask[s], entropy=ent[s], is_ratio=isr[s], normalizers=norms,
                                **{**kw, "old_logprobs": old[s], "ref_logprobs": ref[s]}) for s in parts]
    torch.testing.assert_close(sum(o[0] for o in outs), loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[2] for o in outs]), g_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[3] for o in outs]), g_ent, rtol=1e-12, atol=1e-12)
    for key in metrics:
        if key != "entropy_coef":
            torch.testing.assert_close(sum(o[1][key] for o in outs), metrics[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES + ["clip_cov", "kl_cov"])
def test_all_zero_mask_gives_zero_loss_and_grads(loss_type):
    lp, old, ref, adv, mask, isr, ent = _batch()
    lp = lp.clone()
    lp[:, -1] = float("-inf")
    old[:, -1] = float("-inf")
    ref[:, -1] = float("-inf")
    lp.requires_grad_(True)
    ent.requires_grad_(True)
    zero = torch.zeros_like(mask)
    loss, metrics = grpo_loss(lp, adv, zero, old_logprobs=old, ref_logprobs=ref, entropy=ent, beta=0.04,
                              loss_type=loss_type, max_completion_length=8, entropy_coef=0.1, is_ratio=isr,
                              top_entropy_quantile=0.2)
    g_lp, g_ent = torch.autograd.grad(loss, (lp, ent))
    assert loss.item() == 0.0
    assert torch.all(g_lp == 0) and torch.all(g_ent == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------------------------------------
# every option against the fp64 reference (reference/grpo.py, written from MATH.md)
# ---------------------------------------------------------------------------------------------

OPTIONS = {
    "plain": dict(),
    "delta-kl-is": dict(delta=1.3, beta=0.04, is_ratio=True),
    "kl-biascorr-items": dict(beta=0.04, use_bias_correction_kl=True, num_items_in_batch=13),
    "bonus-full-8020": dict(entropy_coef=0.05, top_entropy_quantile=0.6),
    "bonus-clamped": dict(entropy_coef=0.03, entropy_source="clamped"),
    "bonus-clamped-8020-is": dict(entropy_coef=0.03, entropy_source="clamped", top_entropy_quantile=0.3, is_ratio=True),
    "is-per-row-kl": dict(is_ratio="B1", beta=0.02),
}
ALL_TYPES = LOSS_TYPES + ["luspo-trl", "clip_cov", "kl_cov"]
REF_CASES = [
    (lt, lvl, adv, opt)
    for lt in ALL_TYPES for lvl in ("token", "sequence") for adv in ("B", "BT") for opt in OPTIONS
    if not (lvl == "sequence" and lt in ("clip_cov", "kl_cov"))
]


def _kwargs(case_type, level, opt, isr):
    lt, luspo_norm = ("luspo", "trl") if case_type == "luspo-trl" else (case_type, "liger")
    kw = dict(OPTIONS[opt])
    kw["is_ratio"] = {None: None, True: isr, "B1": isr[:, :1]}[kw.get("is_ratio")]
    kw.update(loss_type=lt, luspo_normalization=luspo_norm, importance_sampling_level=level,
              max_completion_length=7, epsilon_low=0.2, epsilon_high=1.5 if lt == "cispo" else 0.28)
    if lt in ("clip_cov", "kl_cov"):
        kw.update(clip_cov_ratio=0.3, clip_cov_lb=0.05, clip_cov_ub=6.0, kl_cov_ratio=0.2, ppo_kl_coef=0.7)
    return kw


def _compare(case_type, level, adv_shape, opt, seed=0):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs(seed=seed, adv_shape=adv_shape)
    if case_type == "luspo":  # Liger's luspo weights masked positions too: give them finite values
        lp = torch.where(mask, lp, torch.full_like(lp, -1.0))
    kw = _kwargs(case_type, level, opt, isr)
    ref_lp = ref if kw.get("beta") else None
    outs = []
    for fn, gen_seed in ((grpo_loss, 5), (reference.grpo_loss, 5)):
        x = lp.clone().requires_grad_(True)
        e = ent.clone().requires_grad_(True)
        c = cl.clone().requires_grad_(True)
        loss, metrics = fn(x, adv, mask, old_logprobs=old, ref_logprobs=ref_lp, entropy=e, clamped_entropy=c,
                           generator=torch.Generator().manual_seed(gen_seed), **kw)
        grads = torch.autograd.grad(loss, (x, e, c), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x, e, c))]
        outs.append((loss, metrics, grads))
    (got, got_m, got_g), (want, want_m, want_g) = outs
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for name, g, w in zip(("logprobs", "entropy", "clamped_entropy"), got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"grad {name}: {m}")
    assert set(got_m) == set(want_m)
    for key in want_m:
        torch.testing.assert_close(got_m[key], want_m[key], rtol=1e-10, atol=1e-12, msg=lambda m: f"{key}: {m}")
        assert got_m[key].dim() == 0 and not got_m[key].requires_grad
    return got_m


@pytest.mark.parametrize("case_type,level,adv_shape,opt", REF_CASES, ids=["-".join(c) for c in REF_CASES])
def test_against_reference(case_type, level, adv_shape, opt):
    metrics = _compare(case_type, level, adv_shape, opt)
    if case_type in ("clip_cov", "kl_cov"):
        assert metrics["cov/selected_mean"] > 0  # the Cov branch was exercised


@pytest.mark.parametrize("case_type", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cov_selection_against_reference_with_fixed_generator(case_type, seed):
    _compare(case_type, "token", "BT", "plain", seed=seed)


def test_clip_cov_generator_makes_runs_reproducible():
    lp, old, ref, adv, mask, isr, ent, cl = _inputs(b=6, t=9, adv_shape="BT")
    kw = dict(loss_type="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=6.0, old_logprobs=old)
    runs = [grpo_loss(lp, adv, mask, generator=torch.Generator().manual_seed(s), **kw)[0] for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len({float(r) for r in runs}) > 1  # the draw matters


# ---------------------------------------------------------------------------------------------
# entropy bonus and controller
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo", "sapo"])
@pytest.mark.parametrize("source,q", [("full", 1.0), ("clamped", 1.0), ("full", 0.4)])
def test_bonus_changes_gradient_by_exactly_minus_coef_mean_entropy(loss_type, source, q):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs(adv_shape="B")
    lp = torch.where(mask, lp, torch.full_like(lp, -1.0))
    coef = 0.07
    grads = []
    for c in (0.0, coef):
        x, e, k = (t.clone().requires_grad_(True) for t in (lp, ent, cl))
        loss, _ = grpo_loss(x, adv, mask, old_logprobs=old, entropy=e, clamped_entropy=k, loss_type=loss_type,
                            entropy_coef=c, entropy_source=source, top_entropy_quantile=q)
        grads.append([g if g is not None else torch.zeros_like(x)
                      for g in torch.autograd.grad(loss, (x, e, k), allow_unused=True)])
    h = ent if source == "full" else cl
    m_eff = mask.double()
    if q < 1:
        thr = torch.quantile(h[mask], 1 - q)
        m_eff = ((h >= thr) & mask).double()
    expected = -coef * m_eff / m_eff.sum()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)  # policy gradient untouched (q=1 or fixed mask)
    bonus_grad = grads[1][1] if source == "full" else grads[1][2]
    other_grad = grads[1][2] if source == "full" else grads[1][1]
    torch.testing.assert_close(bonus_grad, expected, rtol=1e-14, atol=0)
    assert torch.all(other_grad == 0)


class FakeController:
    def __init__(self, coef):
        self._coef = coef
        self.calls = []

    @property
    def coef(self):
        return self._coef

    def observe(self, entropy_sum, token_count):
        self.calls.append((float(entropy_sum), float(token_count)))


@pytest.mark.parametrize("source,q", [("full", 1.0), ("clamped", 0.5)])
def test_controller_sets_coef_and_observes_in_training_only(source, q):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    ctrl = FakeController(0.04)
    x = lp.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, adv, mask, old_logprobs=old, entropy=ent, clamped_entropy=cl,
                              entropy_controller=ctrl, entropy_source=source, top_entropy_quantile=q)
    want, _ = reference.grpo_loss(x, adv, mask, old_logprobs=old, entropy=ent, clamped_entropy=cl,
                                  entropy_coef=0.04, entropy_source=source, top_entropy_quantile=q)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert metrics["entropy_coef"].item() == pytest.approx(0.04)
    h = ent if source == "full" else cl
    m_eff = mask
    if q < 1:
        m_eff = (h >= torch.quantile(h[mask], 1 - q)) & mask
    assert len(ctrl.calls) == 1
    assert ctrl.calls[0][0] == pytest.approx(float((h * m_eff).sum()), rel=1e-12)
    assert ctrl.calls[0][1] == float(m_eff.sum())
    with torch.no_grad():
        grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, clamped_entropy=cl, entropy_controller=ctrl,
                  entropy_source=source, top_entropy_quantile=q)
    assert len(ctrl.calls) == 1  # evaluation does not move the controller
    ctrl._coef = 0.0  # a controller at 0 still observes
    grpo_loss(x, adv, mask, old_logprobs=old, entropy=ent, clamped_entropy=cl, entropy_controller=ctrl,
              entropy_source=source, top_entropy_quantile=q)
    assert len(ctrl.calls) == 2


def test_controller_and_entropy_coef_together_is_an_error():
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    with pytest.raises(ValueError, match="entropy_coef or entropy_controller"):
        grpo_loss(lp, adv, mask, entropy=ent, entropy_controller=FakeController(0.1), entropy_coef=0.1)


def test_metrics_keys_and_entropy_means():
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    _, m = grpo_loss(lp, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, entropy=ent, clamped_entropy=cl)
    assert set(m) == {"policy_loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                      "entropy", "clamped_entropy", "entropy_coef"}
    torch.testing.assert_close(m["entropy"], ent[mask].mean())
    torch.testing.assert_close(m["clamped_entropy"], cl[mask].mean())
    _, m = grpo_loss(lp, adv, mask, old_logprobs=old)
    assert set(m) == {"policy_loss", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                      "entropy_coef"}


# ---------------------------------------------------------------------------------------------
# 80/20 threshold without torch.quantile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 0.999, 1.0])
def test_quantile_threshold_equals_torch_quantile(n, q):
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, generator=g)
    x[: n // 3] = x[0]  # ties
    torch.testing.assert_close(quantile_threshold(x, q), torch.quantile(x, q), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_quantile_threshold_beyond_torch_quantile_limit():
    n = (1 << 24) + 3  # torch.quantile raises here (TRL's 80/20 mask fails)
    x = torch.randperm(n, generator=torch.Generator().manual_seed(0)).double()
    pos = 0.8 * (n - 1)
    assert quantile_threshold(x, 0.8).item() == pytest.approx(pos, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# precision, shapes, masked garbage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "cispo"])
def test_low_precision_inputs_computed_in_fp32(dtype, loss_type):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs(b=4, t=16)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    kw = dict(loss_type=loss_type, beta=0.04, entropy_coef=0.02, epsilon_high=1.5 if loss_type == "cispo" else 0.28)
    low = [t.to(dtype) for t in (lp, old, ref, adv, ent)]
    gold_in = [t.double() for t in low]  # same rounded inputs, fp64 math
    x = low[0].clone().requires_grad_(True)
    loss, _ = grpo_loss(x, low[3], mask, old_logprobs=low[1], ref_logprobs=low[2], entropy=low[4], **kw)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    xg = gold_in[0].clone().requires_grad_(True)
    want, _ = reference.grpo_loss(xg, gold_in[3], mask, old_logprobs=gold_in[1], ref_logprobs=gold_in[2],
                                  entropy=gold_in[4], **kw)
    (gw,) = torch.autograd.grad(want, xg)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    # the gradient is returned in the input dtype: one rounding of an fp32 value
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(g.double(), gw, rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("shape", ["B", "B1"])
def test_is_ratio_per_sequence_shapes(shape):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    per_seq = isr[:, 0]
    isr_arg = per_seq if shape == "B" else per_seq[:, None]
    got, _ = grpo_loss(lp, adv, mask, old_logprobs=old, is_ratio=isr_arg, loss_type="grpo")
    want, _ = grpo_loss(lp, adv, mask, old_logprobs=old, is_ratio=per_seq[:, None].expand_as(lp), loss_type="grpo")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_masked_garbage_never_matters(loss_type):
    lt, norm = ("luspo", "trl") if loss_type == "luspo-trl" else (loss_type, "liger")
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    kw = dict(loss_type=lt, luspo_normalization=norm, beta=0.04, max_completion_length=7, entropy_coef=0.1,
              top_entropy_quantile=0.7)
    outs = []
    for fill in (float("-inf"), float("nan"), 1e4):
        f = torch.full_like(lp, fill)
        x = torch.where(mask, lp, f).requires_grad_(True)
        e = torch.where(mask, ent, f).requires_grad_(True)
        loss, m = grpo_loss(x, adv, mask, old_logprobs=torch.where(mask, old, f), ref_logprobs=torch.where(mask, ref, f),
                            entropy=e, generator=torch.Generator().manual_seed(0), **kw)
        gx, ge = torch.autograd.grad(loss, (x, e))
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(ge).all()
        assert torch.all(gx[~mask] == 0) and torch.all(ge[~mask] == 0)
        outs.append((loss, gx, ge))
    if lt != "luspo" or norm == "trl":  # luspo(liger) weights finite masked values on purpose
        for o in outs[1:]:
            for a, b in zip(o, outs[0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

BAD = [
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (dict(loss_type="dr_grpo", max_completion_length=0), ValueError, "max_completion_length"),
    (dict(sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos"),
    (dict(sapo_temperature_neg=-1.0), ValueError, "sapo_temperature_neg"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(delta=-2.0), ValueError, "delta"),
    (dict(top_entropy_quantile=-0.1, entropy=True), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=1.5, entropy=True), ValueError, "top_entropy_quantile"),
    (dict(top_entropy_quantile=0.5), ValueError, "entropy"),
    (dict(entropy_coef=0.1), ValueError, "entropy"),
    (dict(entropy_coef=0.1, entropy_source="clamped", entropy=True), ValueError, "clamped_entropy"),
    (dict(entropy_source="topk"), ValueError, "entropy_source"),
    (dict(luspo_normalization="verl"), ValueError, "luspo_normalization"),
    (dict(loss_type="clip_cov", clip_cov_ratio=0.0), ValueError, "clip_cov_ratio"),
    (dict(loss_type="kl_cov", kl_cov_ratio=1.5), ValueError, "kl_cov_ratio"),
    (dict(loss_type="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError, "clip_cov_lb"),
    (dict(loss_type="kl_cov", importance_sampling_level="sequence"), ValueError, "importance_sampling_level"),
    (dict(beta=0.04), ValueError, "ref_logprobs"),
    (dict(epsilon_low=float("nan")), ValueError, "epsilon_low"),
    (dict(vespo_lambda_pos=0.0), ValueError, "vespo_lambda_pos"),
    (dict(entropy_coef=float("inf"), entropy=True), ValueError, "entropy_coef"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(generator=0), TypeError, "generator"),
    (dict(entropy_controller=object(), entropy=True), TypeError, "entropy_controller"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    kwargs = dict(kwargs)
    if kwargs.get("entropy") is True:
        kwargs["entropy"] = ent
    with pytest.raises(exc, match=match):
        grpo_loss(lp, adv, mask, **kwargs)


SHAPES = [
    ("advantages", lambda t: dict(advantages=t["adv"][:2])),
    ("advantages", lambda t: dict(advantages=t["lp"][:, :3])),
    ("mask", lambda t: dict(mask=t["mask"][:, :4])),
    ("old_logprobs", lambda t: dict(old_logprobs=t["lp"][:, :4])),
    ("ref_logprobs", lambda t: dict(ref_logprobs=t["lp"].T, beta=0.1)),
    ("entropy", lambda t: dict(entropy=t["lp"][:2])),
    ("clamped_entropy", lambda t: dict(clamped_entropy=t["lp"][None])),
    ("is_ratio", lambda t: dict(is_ratio=t["lp"][:, :2])),
    ("logprobs", lambda t: dict(logprobs=t["lp"][0])),
]


@pytest.mark.parametrize("name,make", SHAPES, ids=[s[0] + str(i) for i, s in enumerate(SHAPES)])
def test_shape_mismatch_names_argument_and_shapes(name, make):
    lp, old, ref, adv, mask, isr, ent, cl = _inputs()
    args = dict(logprobs=lp, advantages=adv, mask=mask)
    args.update(make(dict(lp=lp, adv=adv, mask=mask)))
    with pytest.raises(ValueError, match=name) as info:
        grpo_loss(**args)
    assert "(" in str(info.value)  # the shapes are in the message


def test_empty_batch_gives_zero():
    lp = torch.zeros(0, 4, requires_grad=True)
    loss, metrics = grpo_loss(lp, torch.zeros(0), torch.zeros(0, 4, dtype=torch.bool), loss_type="grpo")
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())


def _extreme_log_ratios(lp, old, mask, shift):
    """``old`` and ``mask`` with column 2 at ``log r = shift`` and one token pulling row 2 back."""
    old = old.clone()
    old[:, 2] = lp[:, 2] - shift  # log r = shift: clamped to +-20 per token ...
    old[2, 4] = lp[2, 4] + shift * 0.96  # ... and pulled back to a moderate row sum by this one
    mask = mask.clone()
    mask[:, 2] = True
    mask[2, 4] = True
    return old, mask


@pytest.mark.parametrize("shift", [25.0, -25.0])
@pytest.mark.parametrize("case_type", ["vespo", "dapo", "sapo", "cispo"])
def test_extreme_log_ratios_against_reference(case_type, shift):
    """|log r| beyond VESPO's clamps (+-20 per token, [log 1e-8, 20] per row) and huge ratios."""
    lp, old, ref, adv, mask, isr, ent, cl = _inputs(seed=11)
    lp = torch.where(mask, lp, torch.full_like(lp, -2.0))
    old, mask = _extreme_log_ratios(lp, old, mask, shift)
    kw = dict(loss_type=case_type, beta=0.02, is_ratio=isr, epsilon_high=1.5 if case_type == "cispo" else 0.28)
    outs = []
    for fn in (grpo_loss, reference.grpo_loss):
        x = lp.clone().requires_grad_(True)
        loss, _ = fn(x, adv, mask, old_logprobs=old, ref_logprobs=ref, **kw)
        outs.append((loss, torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the Triton objective kernel (moved from test_grpo_triton.py)
# ---------------------------------------------------------------------------------------------

KERNEL_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "luspo-trl", "vespo"]


def _kernel_inputs(b, t, seed=0, adv_shape="B", dtype=torch.float64):
    """The kernel tests' batch: masked log-probs hold -5.0, no clamped entropy."""
    return _inputs(b, t, seed=seed, adv_shape=adv_shape, masked=-5.0, clamped=False, dtype=dtype)


KERNEL_OPTIONS = {
    "plain": dict(),
    "delta-kl-biascorr-is": dict(delta=1.3, beta=0.04, use_bias_correction_kl=True, is_ratio="BT"),
    "kl-is-per-row-8020-bonus": dict(beta=0.02, is_ratio="B1", top_entropy_quantile=0.5, entropy_coef=0.05),
    "no-old": dict(old=False, beta=0.03),
}
KERNEL_CASES = [
    (lt, lvl, adv, opt)
    for lt, lvl, adv, opt in itertools.product(KERNEL_TYPES, ["token", "sequence"], ["B", "BT"], KERNEL_OPTIONS)
    if (adv == "B" or opt == "plain")  # per-token advantages once per type and level
]


def _run(fn, lp, old, ref, adv, mask, isr, ent, case_type, level, opt, **extra):
    lt, norm = ("luspo", "trl") if case_type == "luspo-trl" else (case_type, "liger")
    o = dict(KERNEL_OPTIONS[opt])
    isr_kind = o.pop("is_ratio", None)
    use_old = o.pop("old", True)
    kw = dict(loss_type=lt, luspo_normalization=norm, importance_sampling_level=level, max_completion_length=9,
              epsilon_high=1.5 if lt == "cispo" else 0.28, **o, **extra)
    kw["is_ratio"] = {None: None, "BT": isr, "B1": isr[:, :1]}[isr_kind]
    x = lp.clone().requires_grad_(True)
    e = ent.clone().requires_grad_(True)
    loss, metrics = fn(x, adv, mask, old_logprobs=old if use_old else None,
                       ref_logprobs=ref if kw.get("beta") else None, entropy=e, **kw)
    gx, ge = torch.autograd.grad(loss, (x, e), allow_unused=True)
    return loss, metrics, gx, torch.zeros_like(e) if ge is None else ge


@TRITON_SKIP
@pytest.mark.parametrize("case_type,level,adv_shape,opt", KERNEL_CASES, ids=["-".join(c) for c in KERNEL_CASES])
def test_kernel_against_reference_fp64(case_type, level, adv_shape, opt):
    b, t = 3, 21
    ins = _kernel_inputs(b, t, adv_shape=adv_shape)
    got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, opt, backend="triton")
    want = _run(reference.grpo_loss, *ins, case_type, level, opt)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[3].cpu(), want[3], rtol=1e-10, atol=1e-12)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k].cpu(), want[1][k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


@TRITON_SKIP
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case_type", ["dapo", "vespo", "sapo"])
def test_kernel_loops_over_row_blocks(monkeypatch, case_type, level):
    """T spans several BLOCK_T tiles, with a partial last tile."""
    monkeypatch.setattr(_launch_objective, "MAX_BLOCK_T", 16)
    ins = _kernel_inputs(2, 45, seed=3)
    got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, "delta-kl-biascorr-is", backend="triton")
    want = _run(reference.grpo_loss, *ins, case_type, level, "delta-kl-biascorr-is")
    for g, w in zip((got[0], got[2]), (want[0], want[2])):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@TRITON_SKIP
@pytest.mark.parametrize("b,t", [(1, 1), (1, 17), (4, 1), (2, 1100)], ids=["1x1", "1x17", "4x1", "2x1100"])
def test_kernel_odd_shapes(b, t):
    ins = _kernel_inputs(b, t, seed=b + t)
    for lt, lvl in (("grpo", "sequence"), ("dapo", "token")):
        got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], lt, lvl, "delta-kl-biascorr-is", backend="triton")
        want = _run(grpo_loss, *ins, lt, lvl, "delta-kl-biascorr-is", backend="torch")
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-12, atol=1e-13)


@TRITON_SKIP
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case_type,level", [("dapo", "token"), ("grpo", "sequence"), ("sapo", "token"),
                                             ("vespo", "token")])
def test_kernel_low_precision_no_worse_than_torch(dtype, case_type, level):
    ins = _kernel_inputs(4, 40, seed=7, dtype=dtype)
    gold = _run(reference.grpo_loss, *[x.double() if x.is_floating_point() else x for x in ins], case_type, level,
                "delta-kl-biascorr-is")
    errs = {}
    for be in ("torch", "triton"):
        out = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, "delta-kl-biascorr-is", backend=be)
        errs[be] = (abs(out[0].double().cpu() - gold[0]).item(), (out[2].double().cpu() - gold[2]).abs().max().item())
    assert errs["triton"][0] <= errs["torch"][0] + 1e-6 * max(1.0, abs(gold[0].item()))
    assert errs["triton"][1] <= errs["torch"][1] + 1e-6 * gold[2].abs().max().item()


@TRITON_SKIP
def test_kernel_without_grad_and_strided_inputs():
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _kernel_inputs(3, 40, seed=5, adv_shape="BT")]
    # every other token: row stride != T, last stride 2 (the launcher makes rows contiguous)
    sl = (slice(None), slice(None, None, 2))
    kw = dict(old_logprobs=old[sl], ref_logprobs=ref[sl], beta=0.04, loss_type="dapo", is_ratio=isr[sl])
    want, want_m = grpo_loss(lp[sl], adv[sl], mask[sl], backend="torch", **kw)
    with torch.no_grad():
        got, got_m = grpo_loss(lp[sl], adv[sl], mask[sl], backend="triton", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for k in want_m:
        torch.testing.assert_close(got_m[k], want_m[k], rtol=1e-12, atol=1e-13)


@TRITON_SKIP
@pytest.mark.parametrize("loss_type", KERNEL_TYPES)
def test_kernel_all_zero_mask_and_inf_garbage(loss_type):
    lt, norm = ("luspo", "trl") if loss_type == "luspo-trl" else (loss_type, "liger")
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _kernel_inputs(2, 9)]
    inf = torch.full_like(lp, float("-inf"))
    zero = torch.zeros_like(mask)
    x = inf.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, adv, zero, old_logprobs=inf, ref_logprobs=inf, beta=0.04, loss_type=lt,
                              luspo_normalization=norm, max_completion_length=9, backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.all(g == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


@TRITON_SKIP
@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_types_take_the_torch_path_with_backend_triton(loss_type):
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _kernel_inputs(3, 12, adv_shape="BT")]
    kw = dict(old_logprobs=old, loss_type=loss_type, clip_cov_ratio=0.3, clip_cov_lb=0.05, kl_cov_ratio=0.2)
    got, _ = grpo_loss(lp, adv, mask, backend="triton", generator=torch.Generator(DEVICE).manual_seed(1), **kw)
    want, _ = grpo_loss(lp, adv, mask, backend="torch", generator=torch.Generator(DEVICE).manual_seed(1), **kw)
    assert got == want


@TRITON_SKIP
def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lp, old, ref, adv, mask, isr, ent = _kernel_inputs(2, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        grpo_loss(lp, adv, mask, backend="triton")


@TRITON_SKIP
@pytest.mark.parametrize("shift", [25.0, -25.0, 3.0])
@pytest.mark.parametrize("case_type,opt", [("vespo", "plain"), ("vespo", "kl-is-per-row-8020-bonus"),
                                           ("dapo", "delta-kl-biascorr-is"), ("sapo", "plain")])
def test_kernel_extreme_log_ratios(case_type, opt, shift):
    """|log r| beyond VESPO's clamps (+-20 per token, [log 1e-8, 20] per row) and huge ratios."""
    lp, old, ref, adv, mask, isr, ent = _kernel_inputs(3, 11, seed=11)
    old, mask = _extreme_log_ratios(lp, old, mask, shift)
    got = _run(grpo_loss, *[x.to(DEVICE) for x in (lp, old, ref, adv, mask, isr, ent)], case_type, "token", opt,
               backend="triton")
    want = _run(reference.grpo_loss, lp, old, ref, adv, mask, isr, ent, case_type, "token", opt)
    for g, w in zip((got[0], got[2]), (want[0], want[2])):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)
