"""LinearGRPOLoss beyond Liger parity: entropy bonus, single vs two passes, controllers, memory, bad input.

The gold result for every option Liger does not have is plain autograd through the materialized-logits
reference (``fused_entropy.reference.linear_logprobs``) followed by ``grpo_loss``, in fp64.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_entropy import LinearGRPOLoss, grpo_loss
from fused_entropy import reference as R
from fused_entropy.backends import interpreting

B, T, H, VOCAB = 3, 7, 12, 41
LENGTHS = (7, 4, 2)


def _mask(bsz=B, seqlen=T, lengths=LENGTHS, dtype=torch.float64):
    m = torch.zeros(bsz, seqlen, dtype=dtype)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


def _data(dtype=torch.float64, seed=0, bsz=B, seqlen=T, hidden=H, vocab=VOCAB, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, seqlen, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.3
    ids = torch.randint(0, vocab, (bsz, seqlen), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(x @ w.T + bias, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = lp + 0.4 * torch.randn(bsz, seqlen, generator=g, dtype=torch.float64)
    ref = lp + 0.3 * torch.randn(bsz, seqlen, generator=g, dtype=torch.float64)
    adv = torch.randn(bsz, generator=g, dtype=torch.float64)
    adv_tok = torch.randn(bsz, seqlen, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype)  # noqa: E731
    return dict(x=cast(x), w=cast(w), bias=cast(bias), ids=ids, mask=_mask(bsz, seqlen, lengths), adv=adv,
                adv_tok=adv_tok, old=old, ref=ref)


def _leaves(d, bias=True):
    x = d["x"].clone().requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    b = d["bias"].clone().requires_grad_(True) if bias else None
    return x, w, b


def _module_run(module, d, *, bias=True, adv="adv", old=True, ref=True, **fwd):
    x, w, b = _leaves(d, bias)
    loss, metrics = module(x, w, d["ids"], d["mask"], d[adv], bias=b, old_per_token_logps=d["old"] if old else None,
                           ref_per_token_logps=d["ref"] if ref else None, **fwd)
    loss.backward()
    grads = [x.grad, w.grad] + ([b.grad] if bias else [])
    return loss.detach(), metrics, dict(module.last_metrics), grads


# grpo_loss keyword arguments that correspond to LinearGRPOLoss constructor arguments
_SHARED = ("loss_type", "epsilon_low", "epsilon_high", "delta", "beta", "use_bias_correction_kl",
           "importance_sampling_level", "sapo_temperature_pos", "sapo_temperature_neg", "max_completion_length",
           "entropy_coef", "top_entropy_quantile", "entropy_source", "clip_cov_ratio", "clip_cov_lb",
           "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")


def _gold_run(d, *, bias=True, adv="adv", old=True, ref=True, temperature=1.0, softcap=None, logit_scale=1.0,
              topk=None, clamp_p=None, generator=None, upcast=True, **opts):
    """Materialized logits (reference) -> grpo_loss -> autograd, in fp64 unless ``upcast=False``."""
    if upcast:
        d = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in d.items()}
    x, w, b = _leaves(d, bias)
    targets = torch.where(d["mask"].bool(), d["ids"], torch.full_like(d["ids"], -100))
    if opts.get("loss_type") == "luspo":
        targets = d["ids"]
    st = R.linear_logprobs(x, w, targets, bias=b, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                           topk=topk, clamp_p=clamp_p)
    kw = {k: v for k, v in opts.items() if k in _SHARED}
    if kw.get("beta", 0.0) != 0.0 and not ref:
        kw["ref_logprobs"] = st.logprobs.detach()
    loss, metrics = grpo_loss(st.logprobs, d[adv], d["mask"], old_logprobs=d["old"] if old else None,
                              ref_logprobs=d["ref"] if ref else kw.pop("ref_logprobs", None),
                              entropy=st.entropy, clamped_entropy=st.clamped_entropy, generator=generator, **kw)
    loss.backward()
    grads = [x.grad, w.grad] + ([b.grad] if bias else [])
    return loss.detach(), metrics, grads, st


def _close(a, b, rtol, what):
    a, b = a.detach(), b.detach()
    atol = rtol * float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol + 1e-12, msg=lambda m: f"{what}: {m}")


def _same_run(r1, r2, rtol, what=""):
    loss1, _, met1, g1 = r1
    loss2, _, met2, g2 = r2
    _close(loss1, loss2, rtol, f"{what} loss")
    assert met1.keys() == met2.keys(), f"{what}: metric keys {sorted(met1)} vs {sorted(met2)}"
    for k in met1:
        _close(met1[k], met2[k], rtol, f"{what} metric {k}")
    for name, a, b in zip(("_input", "lin_weight", "bias"), g1, g2):
        _close(a, b, rtol, f"{what} grad {name}")


# ---------------------------------------------------------------------------------------------
# single pass == two passes == materialized reference, over the options Liger does not have
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    "dapo-bonus-full": dict(loss_type="dapo", entropy_coef=0.05),
    "grpo-bonus-clamped-topk": dict(loss_type="grpo", entropy_coef=0.1, entropy_source="clamped", topk=6),
    "bnpo-bonus-clamped-clamp_p": dict(loss_type="bnpo", entropy_coef=-0.2, entropy_source="clamped", clamp_p=0.3),
    "dr_grpo-beta-bonus": dict(loss_type="dr_grpo", max_completion_length=9, beta=0.04, entropy_coef=0.03),
    "gspo-bonus-beta-selfref": dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, entropy_coef=0.07, ref=False),
    "vespo-bonus": dict(loss_type="vespo", entropy_coef=0.05),
    "luspo-bonus-seq": dict(loss_type="luspo", importance_sampling_level="sequence", entropy_coef=0.05),
    "sapo-per-token-adv": dict(loss_type="sapo", adv="adv_tok", entropy_coef=0.05),
    "cispo-softcap-scale-temp": dict(loss_type="cispo", epsilon_high=3.0, softcap=2.5, logit_scale=1.7, temperature=0.6, entropy_coef=0.05),
    "dapo-no-old-no-bias-temp": dict(loss_type="dapo", old=False, bias=False, temperature=1.3, entropy_coef=0.05),
    "dapo-chunks-split-sequences": dict(loss_type="dapo", entropy_coef=0.05, rows_per_chunk=5),
    "grpo-chunks-split-sequences-clamped": dict(loss_type="grpo", entropy_coef=0.05, entropy_source="clamped", topk=3, rows_per_chunk=4),
    "gspo-chunk-rounded-to-sequences": dict(loss_type="bnpo", importance_sampling_level="sequence", rows_per_chunk=9, beta=0.02),
    "one-row-chunks": dict(loss_type="sapo", entropy_coef=0.05, rows_per_chunk=1, topk=4),
}
_MODULE_ONLY = ("temperature", "softcap", "logit_scale", "topk", "clamp_p", "rows_per_chunk")
_FWD = ("bias", "adv", "old", "ref")


def _split(cfg):
    fwd = {k: cfg[k] for k in _FWD if k in cfg}
    ctor = {k: v for k, v in cfg.items() if k not in _FWD}
    gold = {k: v for k, v in cfg.items() if k != "rows_per_chunk"}
    return ctor, fwd, gold


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_pass_equals_two_pass_and_reference(name):
    ctor, fwd, gold = _split(CONFIGS[name])
    ctor.setdefault("beta", 0.0)
    gold.setdefault("beta", 0.0)
    d = _data()
    single = LinearGRPOLoss(use_ref_model=fwd.get("ref", True), **ctor)
    two = LinearGRPOLoss(use_ref_model=fwd.get("ref", True), single_pass=False, **ctor)
    r1 = _module_run(single, d, **fwd)
    r2 = _module_run(two, d, **fwd)
    assert (single.last_path, two.last_path) == ("single", "two")
    _same_run(r1, r2, 1e-10, f"{name}: single vs two")
    g_loss, g_met, g_grads, _ = _gold_run(d, **gold)
    _close(r1[0], g_loss, 1e-10, f"{name} loss vs reference")
    for k, v in g_met.items():
        _close(r1[2][k], v, 1e-10, f"{name} metric {k} vs reference")
    for nm, a, b in zip(("_input", "lin_weight", "bias"), r1[3], g_grads):
        _close(a, b, 1e-9, f"{name} grad {nm} vs reference")


@pytest.mark.parametrize("name", ["dapo-bonus-full", "grpo-chunks-split-sequences-clamped", "gspo-bonus-beta-selfref"])
def test_single_pass_equals_two_pass_fp32(name):
    ctor, fwd, _ = _split(CONFIGS[name])
    d = _data(torch.float32)
    r1 = _module_run(LinearGRPOLoss(use_ref_model=fwd.get("ref", True), **ctor), d, **fwd)
    r2 = _module_run(LinearGRPOLoss(use_ref_model=fwd.get("ref", True), single_pass=False, **ctor), d, **fwd)
    _same_run(r1, r2, 1e-5, f"{name} fp32")


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_losses_two_pass_equal_reference(loss_type):
    d = _data(seed=3)
    opts = dict(loss_type=loss_type, clip_cov_ratio=0.2, clip_cov_lb=-5.0, clip_cov_ub=5.0, kl_cov_ratio=0.2,
                entropy_coef=0.05)
    m = LinearGRPOLoss(beta=0.0, generator=torch.Generator().manual_seed(11), **opts)
    r = _module_run(m, d)
    assert m.last_path == "two"
    g_loss, g_met, g_grads, _ = _gold_run(d, generator=torch.Generator().manual_seed(11), **opts)
    assert float(g_met["cov/selected_mean"]) > 0
    _close(r[0], g_loss, 1e-10, "loss")
    for k, v in g_met.items():
        _close(r[2][k], v, 1e-10, f"metric {k}")
    for a, b in zip(r[3], g_grads):
        _close(a, b, 1e-9, "grad")


def test_top_entropy_quantile_two_pass_equals_reference():
    d = _data(seed=4)
    opts = dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.4, entropy_source="clamped", topk=5)
    m = LinearGRPOLoss(beta=0.0, **opts)
    r = _module_run(m, d)
    assert m.last_path == "two"
    g_loss, g_met, g_grads, _ = _gold_run(d, **opts)
    _close(r[0], g_loss, 1e-10, "loss")
    for a, b in zip(r[3], g_grads):
        _close(a, b, 1e-9, "grad")


def test_reference_model_logprobs_come_from_the_fused_path():
    """ref_input/ref_weight/ref_bias give the same loss as passing the reference's own log-probs."""
    d = _data(seed=5)
    g = torch.Generator().manual_seed(9)
    ref_x = d["x"] + 0.1 * torch.randn(d["x"].shape, generator=g, dtype=torch.float64)
    ref_w = d["w"] + 0.05 * torch.randn(d["w"].shape, generator=g, dtype=torch.float64)
    ref_b = d["bias"] * 0.5
    targets = torch.where(d["mask"].bool(), d["ids"], torch.full_like(d["ids"], -100))
    ref_lp = R.linear_logprobs(ref_x, ref_w, targets, bias=ref_b, temperature=0.8, entropy=False).logprobs
    for single in (None, False):
        kw = dict(beta=0.04, temperature=0.8, entropy_coef=0.02, single_pass=single)
        a = _module_run(LinearGRPOLoss(**kw), d, ref=False, ref_input=ref_x, ref_weight=ref_w, ref_bias=ref_b)
        b = _module_run(LinearGRPOLoss(**kw), dict(d, ref=ref_lp), ref=True)
        _same_run(a, b, 1e-12, f"single_pass={single}")
        assert float(a[2]["kl"]) > 1e-3


# ---------------------------------------------------------------------------------------------
# (c) the bonus changes the gradient by exactly -entropy_coef * d(masked mean entropy)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("single_pass", [None, False], ids=["single", "two"])
@pytest.mark.parametrize("source", [("full", {}), ("clamped", {"topk": 5}), ("clamped", {"clamp_p": 0.25})],
                         ids=["full", "clamped-topk", "clamped-clamp_p"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "luspo"])
def test_bonus_gradient_is_minus_coef_times_mean_entropy_gradient(single_pass, source, loss_type):
    entropy_source, k = source
    coef = 0.37
    d = _data(seed=6)
    base = dict(beta=0.0, loss_type=loss_type, temperature=0.9, single_pass=single_pass, entropy_source=entropy_source, **k)
    r0 = _module_run(LinearGRPOLoss(entropy_coef=0.0, **base), d)
    r1 = _module_run(LinearGRPOLoss(entropy_coef=coef, **base), d)
    # gold: d(masked mean of the bonus entropy) by autograd through materialized logits
    x, w, b = _leaves(d)
    targets = torch.where(d["mask"].bool(), d["ids"], torch.full_like(d["ids"], -100))
    st = R.linear_logprobs(x, w, targets, bias=b, temperature=0.9, **k)
    h = st.entropy if entropy_source == "full" else st.clamped_entropy
    m = d["mask"]
    mean_h = (h * m).sum() / m.sum().clamp(min=1)
    mean_h.backward()
    _close(r1[0] - r0[0], -coef * mean_h.detach(), 1e-10, "loss difference")
    for name, g1, g0, gm in zip(("_input", "lin_weight", "bias"), r1[3], r0[3], (x.grad, w.grad, b.grad)):
        _close(g1 - g0, -coef * gm, 1e-9, f"gradient difference of {name}")
    _close(r1[2]["entropy"], (st.entropy * m).sum() / m.sum(), 1e-10, "entropy metric")
    _close(r1[2]["entropy_coef"], torch.tensor(coef, dtype=torch.float64), 0, "entropy_coef metric")


# ---------------------------------------------------------------------------------------------
# controllers
# ---------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self, coef):
        self.coef = coef
        self.seen = []

    def observe(self, entropy_sum, token_count):
        self.seen.append((float(entropy_sum), float(token_count)))


@pytest.mark.parametrize("single_pass", [None, False], ids=["single", "two"])
def test_controller_sets_coef_and_observes_once_per_training_call(single_pass):
    d = _data(seed=8)
    ctrl = _Recorder(0.2)
    m = LinearGRPOLoss(beta=0.0, entropy_controller=ctrl, single_pass=single_pass)
    r = _module_run(m, d)
    ref = _module_run(LinearGRPOLoss(beta=0.0, entropy_coef=0.2, single_pass=single_pass), d)
    _same_run(r, ref, 1e-12, "controller vs entropy_coef")
    assert len(ctrl.seen) == 1
    st = R.linear_logprobs(d["x"], d["w"], torch.where(d["mask"].bool(), d["ids"], torch.full_like(d["ids"], -100)), bias=d["bias"])
    h_sum = float((st.entropy * d["mask"]).sum())
    assert ctrl.seen[0][0] == pytest.approx(h_sum, rel=1e-10)
    assert ctrl.seen[0][1] == float(d["mask"].sum())
    ctrl.coef = 0.0  # the coefficient is read at every call
    r0 = _module_run(m, d)
    ref0 = _module_run(LinearGRPOLoss(beta=0.0, single_pass=single_pass), d)
    _same_run(r0, ref0, 1e-12, "controller at coef 0")
    m.eval()
    _module_run(m, d)
    with torch.no_grad():
        m.train()
        m(d["x"], d["w"], d["ids"], d["mask"], d["adv"], bias=d["bias"], old_per_token_logps=d["old"])
    assert len(ctrl.seen) == 2, "only training-mode calls with grad enabled observe"


def test_adaptive_controller_from_the_control_package():
    from fused_entropy.control import AdaptiveEntropyCoef

    d = _data(seed=2)
    ctrl = AdaptiveEntropyCoef(target=100.0, delta=0.01, init=0.05, start_enabled=True)
    m = LinearGRPOLoss(beta=0.0, entropy_controller=ctrl)
    r = _module_run(m, d)
    ref = _module_run(LinearGRPOLoss(beta=0.0, entropy_coef=float(ctrl.coef)), d)
    _same_run(r, ref, 1e-12, "adaptive controller")
    before = ctrl.coef
    ctrl.step()
    assert ctrl.coef == pytest.approx(before + 0.01)  # observed entropy is below the target


# ---------------------------------------------------------------------------------------------
# (d) all-zero mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("single_pass", [None, False], ids=["single", "two"])
@pytest.mark.parametrize("loss_type,level", [
    ("grpo", "token"), ("bnpo", "sequence"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
    ("sapo", "token"), ("luspo", "token"), ("vespo", "token"), ("clip_cov", "token"), ("kl_cov", "token"),
])
def test_all_zero_mask_gives_zero_loss_and_gradients(single_pass, loss_type, level):
    d = _data(torch.float32, seed=1)
    d["mask"] = torch.zeros(B, T)
    m = LinearGRPOLoss(beta=0.04, loss_type=loss_type, importance_sampling_level=level, max_completion_length=T,
                       entropy_coef=0.1, entropy_source="clamped", topk=4, single_pass=single_pass)
    loss, metrics, lm, grads = _module_run(m, d)
    # luspo weights every position of a row by the row's token count, which is 0 here
    assert float(loss) == 0.0
    assert all(float(v) == 0.0 for v in metrics)
    for k, v in lm.items():
        assert torch.isfinite(v).all(), k
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch(shape):
    bsz, seqlen = shape
    x = torch.randn(bsz, seqlen, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    for single in (None, False):
        m = LinearGRPOLoss(beta=0.0, entropy_coef=0.1, single_pass=single)
        loss, _ = m(x, w, torch.zeros(shape, dtype=torch.long), torch.ones(shape), torch.randn(bsz))
        loss.backward()
        assert float(loss) == 0.0 and float(w.grad.abs().sum()) == 0.0
        w.grad = None


def test_no_grad_call_runs_forward_only():
    d = _data(torch.float32)
    m = LinearGRPOLoss(beta=0.0, entropy_coef=0.1)
    with torch.no_grad():
        loss, _ = m(d["x"], d["w"], d["ids"], d["mask"], d["adv"], old_per_token_logps=d["old"])
    assert m.last_path == "forward"
    r = _module_run(m, d, bias=False)
    _close(loss, r[0], 1e-6, "no_grad loss vs training loss")


# ---------------------------------------------------------------------------------------------
# (e) no [N, V] tensor on the torch path
# ---------------------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Records the largest output of any aten op (forward, backward, inside autograd.Functions)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_op = None
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.largest_op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("cfg", [
    dict(single_pass=None, rows_per_chunk=64),
    dict(single_pass=None, rows_per_chunk=64, importance_sampling_level="sequence"),
    dict(single_pass=False, entropy_source="clamped", topk=8),
    dict(single_pass=False, top_entropy_quantile=0.5),
], ids=["single", "single-sequence", "two-clamped", "two-8020"])
def test_no_full_logits_tensor_is_created(cfg, monkeypatch):
    # N*V = 4 * 2^21 (32 MiB in fp32): larger than a 16 MiB workspace bound, so a correct backend must chunk.
    monkeypatch.setenv("FUSED_ENTROPY_WORKSPACE_MIB", "16")
    bsz, seqlen, hidden, vocab = 4, 128, 16, 16384
    n = bsz * seqlen
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, seqlen, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_(True)
    ids = torch.randint(0, vocab, (bsz, seqlen), generator=g)
    mask = torch.ones(bsz, seqlen)
    mask[1, 100:] = 0
    ref_x = torch.randn(bsz, seqlen, hidden, generator=g)
    m = LinearGRPOLoss(beta=0.04, entropy_coef=0.1, backend="torch", **cfg)
    mode = _LargestOutput()
    with mode:
        loss, _ = m(x, w, ids, mask, torch.randn(bsz, generator=g), ref_input=ref_x, ref_weight=w.detach())
        loss.backward()
    assert mode.ops > 0 and m.last_path == ("two" if cfg["single_pass"] is False else "single")
    assert mode.largest < n * vocab // 2, f"{mode.largest_op} produced {mode.largest} elements (N*V = {n * vocab})"
    assert torch.isfinite(x.grad).all() and float(w.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------
# (f) the Triton backend under TRITON_INTERPRET=1
# ---------------------------------------------------------------------------------------------


def _triton_backend_available():
    try:
        from fused_entropy.backends import triton as _  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not interpreting(), reason="the Triton backend on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("cfg", [dict(loss_type="dapo", entropy_coef=0.1),
                                 dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                                      entropy_coef=0.05, entropy_source="clamped", topk=4, temperature=0.7),
                                 dict(loss_type="bnpo", entropy_coef=0.05, entropy_source="clamped", clamp_p=0.3,
                                      softcap=3.0)],
                         ids=["dapo-bonus", "gspo-clamped-beta", "bnpo-clamp_p-softcap"])
def test_triton_backend_equals_torch_backend(cfg):
    if not _triton_backend_available():
        pytest.fail("fused_entropy.backends.triton is not importable")
    d = _data(torch.float32, seed=12, bsz=2, seqlen=5, hidden=16, vocab=40, lengths=(5, 3))
    from fused_entropy.backends import triton as triton_backend

    m_t = LinearGRPOLoss(backend="triton", **cfg)
    r_t = _module_run(m_t, d)
    # the Triton backend takes the single pass once it offers linear_forward_backward
    assert m_t.last_path == ("single" if hasattr(triton_backend, "linear_forward_backward") else "two")
    r_c = _module_run(LinearGRPOLoss(backend="torch", **cfg), d)
    _same_run(r_t, r_c, 1e-5, "triton vs torch")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(delta=0.0), ValueError, "delta"),
    (dict(sapo_temperature_neg=-1.0), ValueError, "sapo_temperature_neg"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(entropy_source="topk"), ValueError, "entropy_source"),
    (dict(entropy_source="clamped"), ValueError, "topk or clamp_p"),
    (dict(topk=0), ValueError, "topk"),
    (dict(clamp_p=1.5), ValueError, "clamp_p"),
    (dict(topk=3, clamp_p=0.2), ValueError, "at most one"),
    (dict(top_entropy_quantile=-0.1), ValueError, "top_entropy_quantile"),
    (dict(entropy_coef=0.1, entropy_controller=_Recorder(0.1)), ValueError, "not both"),
    (dict(entropy_controller=object()), TypeError, "entropy_controller"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), ValueError, "clip_cov_lb"),
    (dict(single_pass=True, top_entropy_quantile=0.5), ValueError, "single_pass"),
    (dict(single_pass=True, loss_type="kl_cov"), ValueError, "single_pass"),
    (dict(rows_per_chunk=0), ValueError, "rows_per_chunk"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LinearGRPOLoss(**kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    # Liger 0.8.5 constructs these and rejects them in forward; so does LinearGRPOLoss
    (dict(loss_type="ppo"), ValueError, "loss_type"),
    (dict(importance_sampling_level="batch"), ValueError, "importance_sampling_level"),
    (dict(loss_type="cispo", importance_sampling_level="sequence"), ValueError, "importance_sampling_level"),
    (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
])
def test_bad_configurations_liger_rejects_in_forward(kwargs, exc, match):
    d = _data(torch.float32)
    m = LinearGRPOLoss(beta=0.0, **kwargs)
    with pytest.raises(exc, match=match):
        m(d["x"], d["w"], d["ids"], d["mask"], d["adv"])


def _bad_forward_cases():
    d = _data(torch.float32)
    x, w, ids, mask, adv = d["x"], d["w"], d["ids"], d["mask"], d["adv"]
    return {
        "input-2d": ((x[0], w, ids, mask, adv), {}, "_input"),
        "weight-H": ((x, w[:, :5], ids, mask, adv), {}, "lin_weight"),
        "weight-dtype": ((x, w.double(), ids, mask, adv), {}, "lin_weight"),
        "ids-shape": ((x, w, ids[:, :3], mask, adv), {}, "selected_token_ids"),
        "ids-float": ((x, w, ids.float(), mask, adv), {}, "selected_token_ids"),
        "ids-range": ((x, w, ids + VOCAB, mask, adv), {}, "selected_token_ids"),
        "mask-shape": ((x, w, ids, mask[:2], adv), {}, "attention_mask"),
        "adv-shape": ((x, w, ids, mask, adv[:2]), {}, "advantages"),
        "old-shape": ((x, w, ids, mask, adv), dict(old_per_token_logps=d["old"][:, :2].float()), "old_per_token_logps"),
        "ref-shape": ((x, w, ids, mask, adv), dict(ref_per_token_logps=d["ref"].float().T), "ref_per_token_logps"),
        "bias-shape": ((x, w, ids, mask, adv), dict(bias=d["bias"][:5].float()), "bias"),
        "is-shape": ((x, w, ids, mask, adv), dict(vllm_is_ratio=torch.ones(B, 2)), "vllm_is_ratio"),
        "ref-missing": ((x, w, ids, mask, adv), {}, "ref_per_token_logps or ref_input"),
        "ref-weight-missing": ((x, w, ids, mask, adv), dict(ref_input=x), "ref_weight"),
        "ref-input-shape": ((x, w, ids, mask, adv), dict(ref_input=x[:1], ref_weight=w), "ref_input"),
    }


@pytest.mark.parametrize("case", list(_bad_forward_cases()))
def test_bad_forward_inputs(case):
    args, kwargs, match = _bad_forward_cases()[case]
    m = LinearGRPOLoss(beta=0.04, use_ref_model=True)
    with pytest.raises((ValueError, TypeError), match=match):
        m(*args, **kwargs)


def test_topk_larger_than_vocab_is_rejected_at_call():
    d = _data(torch.float32)
    with pytest.raises(ValueError, match="topk"):
        LinearGRPOLoss(beta=0.0, topk=VOCAB + 1)(d["x"], d["w"], d["ids"], d["mask"], d["adv"])


def test_low_precision_error_no_worse_than_plain_torch():
    """bf16 hidden states and head: error vs the fp64 gold no worse than plain torch in bf16 (+ margin)."""
    d64 = _data(seed=10)
    d16 = dict(d64, x=d64["x"].bfloat16(), w=d64["w"].bfloat16(), bias=d64["bias"].bfloat16())
    opts = dict(loss_type="dapo", entropy_coef=0.1, beta=0.04)
    gold = _gold_run(d64, **opts)
    ours = _module_run(LinearGRPOLoss(**opts), d16)
    plain = _gold_run(d16, upcast=False, **opts)  # the reference itself, run on bf16 tensors
    for i, name in enumerate(("_input", "lin_weight", "bias")):
        err_ours = float((ours[3][i].double() - gold[2][i]).abs().max())
        err_plain = float((plain[2][i].double() - gold[2][i]).abs().max())
        assert err_ours <= 1.1 * err_plain + 1e-3 * float(gold[2][i].abs().max()), (name, err_ours, err_plain)
    assert abs(float(ours[0]) - float(gold[0])) <= 1.1 * abs(float(plain[0]) - float(gold[0])) + 1e-4


@pytest.mark.parametrize("frozen", ["lin_weight", "_input"])
def test_single_pass_frozen_input_costs_no_gradient_product(frozen, monkeypatch):
    """needs= reaches the single pass: a frozen LM head gets no dW product, a frozen input no dX."""
    from fused_entropy.backends import torch_chunked

    seen = {}
    real = torch_chunked.linear_forward_backward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["needs"], seen["grads"] = kwargs["needs"], out[1:]
        return out

    monkeypatch.setattr(torch_chunked, "linear_forward_backward", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=frozen != "_input")
    w = torch.randn(30, 8, generator=g, requires_grad=frozen != "lin_weight")
    ids = torch.randint(0, 30, (2, 5), generator=g)
    mask = torch.ones(2, 5)
    adv = torch.randn(2, generator=g)
    loss_fn = LinearGRPOLoss(beta=0.0, loss_type="dapo", entropy_coef=0.01, backend="torch", single_pass=True)
    loss, _ = loss_fn(x, w, ids, mask, adv)
    loss.backward()
    assert loss_fn.last_path == "single"
    assert seen["needs"] == (frozen != "_input", frozen != "lin_weight", False)
    assert (seen["grads"][0] is None) == (frozen == "_input") and (seen["grads"][1] is None) == (frozen == "lin_weight")
    two = LinearGRPOLoss(beta=0.0, loss_type="dapo", entropy_coef=0.01, backend="torch", single_pass=False)
    live = x if frozen == "lin_weight" else w
    want = torch.autograd.grad(two(x, w, ids, mask, adv)[0], live)[0]
    torch.testing.assert_close(live.grad, want, rtol=1e-5, atol=1e-6)
