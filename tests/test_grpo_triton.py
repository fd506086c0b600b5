"""grpo_loss through the Triton objective kernel (kernels/objective.py) against the fp64 reference.

Runs on CUDA, or on CPU with TRITON_INTERPRET=1 (how CI runs it); shapes are small for the interpreter.
"""
import itertools

import pytest
import torch

from fused_entropy import grpo_loss, reference
from fused_entropy import _launch_objective

from conftest import DEVICE, TRITON_SKIP

pytestmark = TRITON_SKIP

KERNEL_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "luspo-trl", "vespo"]


def _inputs(b, t, seed=0, adv_shape="B", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    lp = -torch.rand(b, t, generator=g, dtype=d) * 3
    old = lp + 0.4 * torch.randn(b, t, generator=g, dtype=d)
    ref = lp + 0.4 * torch.randn(b, t, generator=g, dtype=d)
    adv = 2 * torch.randn(b, generator=g, dtype=d) if adv_shape == "B" else 2 * torch.randn(b, t, generator=g, dtype=d)
    if b > 1:
        adv[1] = 0.0
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[-1, -2:] = False
    mask[0, 0] = True
    isr = torch.rand(b, t, generator=g, dtype=d) + 0.5
    ent = torch.rand(b, t, generator=g, dtype=d) * 3
    lp = torch.where(mask, lp, torch.full_like(lp, -5.0))
    return [x.to(dtype) if x.is_floating_point() else x for x in (lp, old, ref, adv, mask, isr, ent)]


OPTIONS = {
    "plain": dict(),
    "delta-kl-biascorr-is": dict(delta=1.3, beta=0.04, use_bias_correction_kl=True, is_ratio="BT"),
    "kl-is-per-row-8020-bonus": dict(beta=0.02, is_ratio="B1", top_entropy_quantile=0.5, entropy_coef=0.05),
    "no-old": dict(old=False, beta=0.03),
}
CASES = [
    (lt, lvl, adv, opt)
    for lt, lvl, adv, opt in itertools.product(KERNEL_TYPES, ["token", "sequence"], ["B", "BT"], OPTIONS)
    if (adv == "B" or opt == "plain")  # per-token advantages once per type and level
]


def _run(fn, lp, old, ref, adv, mask, isr, ent, case_type, level, opt, **extra):
    lt, norm = ("luspo", "trl") if case_type == "luspo-trl" else (case_type, "liger")
    o = dict(OPTIONS[opt])
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


@pytest.mark.parametrize("case_type,level,adv_shape,opt", CASES, ids=["-".join(c) for c in CASES])
def test_kernel_against_reference_fp64(case_type, level, adv_shape, opt):
    b, t = 3, 21
    ins = _inputs(b, t, adv_shape=adv_shape)
    got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, opt, backend="triton")
    want = _run(reference.grpo_loss, *ins, case_type, level, opt)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[3].cpu(), want[3], rtol=1e-10, atol=1e-12)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k].cpu(), want[1][k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("case_type", ["dapo", "vespo", "sapo"])
def test_kernel_loops_over_row_blocks(monkeypatch, case_type, level):
    """T spans several BLOCK_T tiles, with a partial last tile."""
    monkeypatch.setattr(_launch_objective, "MAX_BLOCK_T", 16)
    ins = _inputs(2, 45, seed=3)
    got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, "delta-kl-biascorr-is", backend="triton")
    want = _run(reference.grpo_loss, *ins, case_type, level, "delta-kl-biascorr-is")
    for g, w in zip((got[0], got[2]), (want[0], want[2])):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,t", [(1, 1), (1, 17), (4, 1), (2, 1100)], ids=["1x1", "1x17", "4x1", "2x1100"])
def test_kernel_odd_shapes(b, t):
    ins = _inputs(b, t, seed=b + t)
    for lt, lvl in (("grpo", "sequence"), ("dapo", "token")):
        got = _run(grpo_loss, *[x.to(DEVICE) for x in ins], lt, lvl, "delta-kl-biascorr-is", backend="triton")
        want = _run(grpo_loss, *ins, lt, lvl, "delta-kl-biascorr-is", backend="torch")
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(got[2].cpu(), want[2], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case_type,level", [("dapo", "token"), ("grpo", "sequence"), ("sapo", "token"),
                                             ("vespo", "token")])
def test_kernel_low_precision_no_worse_than_torch(dtype, case_type, level):
    ins = _inputs(4, 40, seed=7, dtype=dtype)
    gold = _run(reference.grpo_loss, *[x.double() if x.is_floating_point() else x for x in ins], case_type, level,
                "delta-kl-biascorr-is")
    errs = {}
    for be in ("torch", "triton"):
        out = _run(grpo_loss, *[x.to(DEVICE) for x in ins], case_type, level, "delta-kl-biascorr-is", backend=be)
        errs[be] = (abs(out[0].double().cpu() - gold[0]).item(), (out[2].double().cpu() - gold[2]).abs().max().item())
    assert errs["triton"][0] <= errs["torch"][0] + 1e-6 * max(1.0, abs(gold[0].item()))
    assert errs["triton"][1] <= errs["torch"][1] + 1e-6 * gold[2].abs().max().item()


def test_kernel_without_grad_and_strided_inputs():
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _inputs(3, 40, seed=5, adv_shape="BT")]
    # every other token: row stride != T, last stride 2 (the launcher makes rows contiguous)
    sl = (slice(None), slice(None, None, 2))
    kw = dict(old_logprobs=old[sl], ref_logprobs=ref[sl], beta=0.04, loss_type="dapo", is_ratio=isr[sl])
    want, want_m = grpo_loss(lp[sl], adv[sl], mask[sl], backend="torch", **kw)
    with torch.no_grad():
        got, got_m = grpo_loss(lp[sl], adv[sl], mask[sl], backend="triton", **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    for k in want_m:
        torch.testing.assert_close(got_m[k], want_m[k], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("loss_type", KERNEL_TYPES)
def test_kernel_all_zero_mask_and_inf_garbage(loss_type):
    lt, norm = ("luspo", "trl") if loss_type == "luspo-trl" else (loss_type, "liger")
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _inputs(2, 9)]
    inf = torch.full_like(lp, float("-inf"))
    zero = torch.zeros_like(mask)
    x = inf.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, adv, zero, old_logprobs=inf, ref_logprobs=inf, beta=0.04, loss_type=lt,
                              luspo_normalization=norm, max_completion_length=9, backend="triton")
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.all(g == 0)
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss_type", ["clip_cov", "kl_cov"])
def test_cov_types_take_the_torch_path_with_backend_triton(loss_type):
    lp, old, ref, adv, mask, isr, ent = [x.to(DEVICE) for x in _inputs(3, 12, adv_shape="BT")]
    kw = dict(old_logprobs=old, loss_type=loss_type, clip_cov_ratio=0.3, clip_cov_lb=0.05, kl_cov_ratio=0.2)
    got, _ = grpo_loss(lp, adv, mask, backend="triton", generator=torch.Generator(DEVICE).manual_seed(1), **kw)
    want, _ = grpo_loss(lp, adv, mask, backend="torch", generator=torch.Generator(DEVICE).manual_seed(1), **kw)
    assert got == want


def test_triton_backend_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lp, old, ref, adv, mask, isr, ent = _inputs(2, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        grpo_loss(lp, adv, mask, backend="triton")


@pytest.mark.parametrize("shift", [25.0, -25.0, 3.0])
@pytest.mark.parametrize("case_type,opt", [("vespo", "plain"), ("vespo", "kl-is-per-row-8020-bonus"),
                                           ("dapo", "delta-kl-biascorr-is"), ("sapo", "plain")])
def test_kernel_extreme_log_ratios(case_type, opt, shift):
    """|log r| beyond VESPO's clamps (+-20 per token, [log 1e-8, 20] per row) and huge ratios."""
    lp, old, ref, adv, mask, isr, ent = _inputs(3, 11, seed=11)
    old = old.clone()
    old[:, 2] = lp[:, 2] - shift  # log r = shift: clamped to +-20 per token ...
    old[2, 4] = lp[2, 4] + shift * 0.96  # ... and pulled back to a moderate row sum by this one
    mask = mask.clone()
    mask[:, 2] = True
    mask[2, 4] = True
    got = _run(grpo_loss, *[x.to(DEVICE) for x in (lp, old, ref, adv, mask, isr, ent)], case_type, "token", opt,
               backend="triton")
    want = _run(reference.grpo_loss, lp, old, ref, adv, mask, isr, ent, case_type, "token", opt)
    for g, w in zip((got[0], got[2]), (want[0], want[2])):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)
