"""grpo_loss (torch path) against liger-kernel 0.8.5's loss math, the fp64 reference and bad input."""
import itertools

import pytest
import torch

from fused_entropy import grpo_loss, grpo_loss_and_grads, grpo_normalizers

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
