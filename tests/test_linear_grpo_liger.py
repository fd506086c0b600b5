"""LinearGRPOLoss (entropy_coef=0) equals liger-kernel 0.8.5's LigerFusedLinearGRPOLoss.

Full product, not a covering design: every loss type x token/sequence importance sampling (where
Liger allows it) x delta on/off x beta 0/0.04 x old log-probs on/off x reference none / log-probs /
reference model (ref_input, ref_weight, ref_bias through the fused path) x bias on/off x temperature
1 / 0.7, on a batch with padding (rows of 6, 4, 1 and 0 valid tokens). 1248 cases; each runs Liger
once and LinearGRPOLoss on both of its paths (single pass where possible, and two passes) at a few
milliseconds per run, so the product stays cheap. Loss, every metric of Liger's tuple and the
gradients of _input, lin_weight and bias must agree in fp32 to rtol 1e-5 (atol 1e-5 of the largest
entry, so near-zero entries are held to the same normwise accuracy).
"""
from __future__ import annotations

import itertools

import pytest
import torch

liger_grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")

from fused_entropy import LinearGRPOLoss  # noqa: E402

B, T, H, VOCAB = 4, 6, 16, 50
LENGTHS = (6, 4, 1, 0)

LOSS_LEVELS = [
    (lt, lvl)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
    for lvl in ("token", "sequence")
    if not (lvl == "sequence" and lt in ("cispo", "sapo", "vespo"))
]
CASES = list(itertools.product(
    LOSS_LEVELS,
    (None, 1.1),                 # delta
    (0.0, 0.04),                 # beta
    (False, True),               # old log-probs
    ("none", "logps", "model"),  # reference
    (False, True),               # bias
    (1.0, 0.7),                  # temperature
))


def _case_id(case):
    (lt, lvl), delta, beta, old, ref, bias, temp = case
    return f"{lt}-{lvl}-d{delta}-b{beta}-old{int(old)}-ref_{ref}-bias{int(bias)}-T{temp}"


def _inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(VOCAB, H, generator=g) * 0.4
    bias = torch.randn(VOCAB, generator=g) * 0.3
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    adv = torch.tensor([1.2, -0.7, 0.5, -1.1])
    # old/ref log-probs near the policy's own, so ratios straddle the clip range and the KL is not 0
    with torch.no_grad():
        lp = torch.log_softmax((x @ w.T + bias) / 0.85, -1).gather(-1, ids[..., None]).squeeze(-1)
    old = lp + 0.4 * torch.randn(B, T, generator=g)
    ref = lp + 0.3 * torch.randn(B, T, generator=g)
    ref_x = x + 0.1 * torch.randn(B, T, H, generator=g)
    ref_w = w + 0.05 * torch.randn(VOCAB, H, generator=g)
    ref_b = bias + 0.05 * torch.randn(VOCAB, generator=g)
    return dict(x=x, w=w, bias=bias, ids=ids, mask=mask, adv=adv, old=old, ref=ref, ref_x=ref_x, ref_w=ref_w, ref_b=ref_b)


DATA = _inputs()


def _run(module, d, *, old, ref, bias, **fwd):
    x = d["x"].clone().requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    b = d["bias"].clone().requires_grad_(True) if bias else None
    kwargs = dict(
        bias=b,
        old_per_token_logps=d["old"] if old else None,
        ref_per_token_logps=d["ref"] if ref == "logps" else None,
        ref_input=d["ref_x"] if ref == "model" else None,
        ref_weight=d["ref_w"] if ref == "model" else None,
        ref_bias=(d["ref_b"] if bias else None) if ref == "model" else None,
        **fwd,
    )
    loss, metrics = module(x, w, d["ids"], d["mask"], d["adv"], **kwargs)
    loss.backward()
    return [loss.detach(), *[m.detach() for m in metrics], x.grad, w.grad] + ([b.grad] if bias else [])


def _assert_same(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} outputs vs Liger's {len(theirs)}"
    names = ["loss", *[f"metric[{i}]" for i in range(len(theirs) - 4)], "grad _input", "grad lin_weight", "grad bias"]
    for name, a, b in zip(names, ours, theirs):
        assert a.shape == b.shape, f"{what} {name}: shape {tuple(a.shape)} vs Liger {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{what} {name} is not finite"
        atol = 1e-5 * float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol + 1e-9, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_equals_liger(case):
    (loss_type, level), delta, beta, old, ref, bias, temperature = case
    common = dict(
        beta=beta, use_ref_model=ref != "none", loss_type=loss_type, importance_sampling_level=level,
        delta=delta, temperature=temperature, max_completion_length=T,
    )
    theirs = _run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **common), DATA, old=old, ref=ref, bias=bias)
    auto = LinearGRPOLoss(**common)
    _assert_same(_run(auto, DATA, old=old, ref=ref, bias=bias), theirs, "auto path")
    assert auto.last_path == "single"
    two = LinearGRPOLoss(single_pass=False, **common)
    _assert_same(_run(two, DATA, old=old, ref=ref, bias=bias), theirs, "two-pass path")
    assert two.last_path == "two"


IS_CASES = [
    ("dapo", "token", (B, T)), ("grpo", "sequence", (B, 1)), ("vespo", "token", (B, T)),
    ("vespo", "token", (B,)), ("cispo", "token", (B, 1)), ("sapo", "token", (B, T)),
]


@pytest.mark.parametrize("loss_type,level,shape", IS_CASES, ids=[f"{a}-{b}-{len(c)}d{c[-1]}" for a, b, c in IS_CASES])
def test_equals_liger_vllm_is_ratio_and_bias_corrected_kl(loss_type, level, shape):
    g = torch.Generator().manual_seed(7)
    isr = torch.rand(shape, generator=g) * 0.8 + 0.6
    common = dict(beta=0.04, use_ref_model=True, loss_type=loss_type, importance_sampling_level=level,
                  temperature=0.7, use_bias_correction_kl=True)
    fwd = dict(vllm_is_ratio=isr)
    theirs = _run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **common), DATA, old=True, ref="logps", bias=True, **fwd)
    for single in (None, False):
        ours = _run(LinearGRPOLoss(single_pass=single, **common), DATA, old=True, ref="logps", bias=True, **fwd)
        _assert_same(ours, theirs, f"single_pass={single}")


@pytest.mark.parametrize("loss_type", ["dapo", "cispo", "vespo"])
@pytest.mark.parametrize("num_items", [7, torch.tensor(40.0)], ids=["int", "tensor"])
def test_equals_liger_num_items_in_batch(loss_type, num_items):
    common = dict(beta=0.0, use_ref_model=False, loss_type=loss_type, temperature=0.7)
    fwd = dict(num_items_in_batch=num_items)
    theirs = _run(liger_grpo.LigerFusedLinearGRPOLoss(compiled=False, **common), DATA, old=True, ref="none", bias=False, **fwd)
    for single in (None, False):
        ours = _run(LinearGRPOLoss(single_pass=single, **common), DATA, old=True, ref="none", bias=False, **fwd)
        _assert_same(ours, theirs, f"single_pass={single}")


def test_inputs_exercise_clipping_and_kl():
    """Guard against a vacuous comparison: the data above must clip tokens on both sides and give KL > 0."""
    m = LinearGRPOLoss(beta=0.04, loss_type="dapo", temperature=0.7)
    _run(m, DATA, old=True, ref="logps", bias=True)
    lm = m.last_metrics
    assert float(lm["clip_ratio/low_mean"]) > 0 and float(lm["clip_ratio/high_mean"]) > 0
    assert float(lm["kl"]) > 1e-3
