"""integrations.verl.linear_cross_entropy against a materialized-logits torch reference (verl semantics)."""

import pytest
import torch
import torch.nn.functional as F

from fused_entropy.integrations.verl import linear_cross_entropy

from _dist_utils import run_ranks


def reference(hidden, weight, labels, temperature=1.0, reduction="none"):
    """verl's contract written out with full logits, in the dtype of the inputs."""
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = h @ weight.T / temperature
    lse = torch.logsumexp(logits, -1)
    p = torch.softmax(logits, -1)
    entropy = lse - (p * logits).sum(-1)
    logprobs = -F.cross_entropy(logits, labels.reshape(-1), reduction=reduction)
    return logprobs, entropy


def _inputs(lead, hid, vocab, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, hid, generator=g, dtype=dtype)
    weight = torch.randn(vocab, hid, generator=g, dtype=dtype) / hid**0.5
    labels = torch.randint(0, vocab, lead, generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "MEAN"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("lead", [(7,), (1, 9), (2, 5)], ids=["N7", "1x9", "2x5"])
def test_forward_and_gradients_match_reference(reduction, temperature, lead):
    hidden, weight, labels = _inputs(lead, 13, 37)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = linear_cross_entropy(h1, w1, labels, temperature, reduction)
    lp_ref, ent_ref = reference(h2, w2, labels, temperature, reduction.lower())

    n = labels.numel()
    assert ent.shape == (n,)
    assert lp.shape == (() if reduction.lower() != "none" else (n,))
    torch.testing.assert_close(lp, lp_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-10, atol=1e-10)
    assert (lp <= 0).all() if reduction == "none" else True

    # Weight both outputs with random upstream gradients so each one's backward is checked.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(lp.shape, generator=g, dtype=lp.dtype)
    b = torch.randn(n, generator=g, dtype=ent.dtype)
    ((lp * a).sum() + (ent * b).sum()).backward()
    ((lp_ref * a).sum() + (ent_ref * b).sum()).backward()
    assert h1.grad.shape == hidden.shape
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-10)


def test_entropy_only_gradient():
    hidden, weight, labels = _inputs((6,), 8, 21)
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    linear_cross_entropy(h1, weight, labels)[1].sum().backward()
    reference(h2, weight, labels)[1].sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-10)


def test_bf16_error_no_worse_than_torch():
    hidden, weight, labels = _inputs((64,), 32, 300, dtype=torch.float64, seed=3)
    gold_lp, gold_ent = reference(hidden, weight, labels)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    lp, ent = linear_cross_entropy(hb, wb, labels)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    t_lp, t_ent = reference(hb, wb, labels)  # plain torch with bf16 logits
    err = lambda x, gold: (x.double() - gold).abs().max().item()
    assert err(lp, gold_lp) <= err(t_lp, gold_lp) + 1e-3
    assert err(ent, gold_ent) <= err(t_ent, gold_ent) + 1e-3


def test_very_negative_logits_are_finite():
    # every logit is -120 (below fp32 exp underflow): a running max initialised to 0 would give inf/NaN
    hid, vocab = 16, 10
    hidden = torch.full((3, hid), 20.0)
    weight = -torch.ones(vocab, hid) * 0.375
    lp, ent = linear_cross_entropy(hidden, weight, torch.tensor([0, 4, 9]))
    torch.testing.assert_close(lp, torch.full((3,), -torch.log(torch.tensor(10.0)).item()))
    torch.testing.assert_close(ent, torch.full((3,), torch.log(torch.tensor(10.0)).item()))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch(reduction):
    hidden = torch.zeros(0, 8, requires_grad=True)
    lp, ent = linear_cross_entropy(hidden, torch.randn(5, 8), torch.zeros(0, dtype=torch.long), reduction=reduction)
    assert ent.shape == (0,)
    assert torch.isfinite(lp).all()
    (lp.sum() + ent.sum()).backward()


def test_bad_input():
    hidden, weight, labels = _inputs((4,), 8, 11, dtype=torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, -100, 2]))
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match="one id per token"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(hidden, weight, labels, 0.0)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, H\]"):
        linear_cross_entropy(hidden, weight[0], labels)
    with pytest.raises(ValueError, match="hidden must have shape"):
        linear_cross_entropy(hidden[:, :5], weight, labels)
    with pytest.raises(TypeError, match="labels"):
        linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        linear_cross_entropy(hidden, weight, labels, dist_process_group=object())


# --- tensor parallelism over the vocabulary: 2 gloo ranks against the single-process result -------


def _tp_worker(rank, world):
    import torch.distributed as dist

    hidden, weight, labels = _inputs((2, 7), 12, 2 * 9)
    vocab_local = weight.shape[0] // world
    h = hidden.clone().requires_grad_()
    w = weight[rank * vocab_local : (rank + 1) * vocab_local].clone().requires_grad_()
    lp, ent = linear_cross_entropy(h, w, labels, 0.8, "none", dist_process_group=dist.group.WORLD)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(lp.shape, generator=g, dtype=lp.dtype), torch.randn(ent.shape, generator=g, dtype=ent.dtype)
    ((lp * a).sum() + (ent * b).sum()).backward()
    return {"lp": lp.detach(), "ent": ent.detach(), "dh": h.grad, "dw": w.grad}


def test_tensor_parallel_matches_single_process(tmp_path):
    # run_ranks: forked ranks on one intra-op thread each (a fork after the parent's OpenMP pool has
    # run can deadlock the child's first parallel op) and a deadline instead of a hang
    res = run_ranks(_tp_worker, 2, tmp_path)

    hidden, weight, labels = _inputs((2, 7), 12, 2 * 9)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = reference(h, w, labels, 0.8)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(lp.shape, generator=g, dtype=lp.dtype), torch.randn(ent.shape, generator=g, dtype=ent.dtype)
    ((lp * a).sum() + (ent * b).sum()).backward()
    for r in res:  # outputs are global and identical on every rank
        torch.testing.assert_close(r["lp"], lp.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(r["ent"], ent.detach(), rtol=1e-10, atol=1e-10)
    # each rank: gradient of its own weight slice; d hidden is partial and sums to the full gradient
    torch.testing.assert_close(torch.cat([r["dw"] for r in res]), w.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sum(r["dh"] for r in res), h.grad, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(res[0]["dh"], h.grad)
