"""grpo_loss across two gloo ranks: DAPO's all-reduced token count and the 80/20 threshold gathered
over ranks with different numbers of valid tokens."""
import pytest
import torch
import torch.distributed as dist

from fused_entropy import grpo_loss, grpo_normalizers

from _dist_utils import run_ranks

Q = 0.3


def _rank_batch(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b, t = (2, 7) if rank == 0 else (3, 5)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > (0.2 if rank == 0 else 0.6)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return lp, old, adv, mask, ent


def _worker(rank, world):
    lp, old, adv, mask, ent = _rank_batch(rank)
    loss, _ = grpo_loss(lp, adv, mask, old_logprobs=old, loss_type="dapo")
    norms = grpo_normalizers(mask, loss_type="dapo", top_entropy_quantile=Q, entropy=ent, dtype=torch.float64)
    loss_q, _ = grpo_loss(lp, adv, mask, old_logprobs=old, entropy=ent, loss_type="dapo",
                          top_entropy_quantile=Q, entropy_coef=0.1)
    return {"loss": loss.item(), "loss_q": loss_q.item(), "threshold": norms.entropy_threshold.item(),
            "policy_denom": norms.policy_denom.item(), "bonus_denom": norms.bonus_denom.item()}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_share_token_count_and_entropy_threshold(tmp_path):
    got = run_ranks(_worker, 2, tmp_path)
    batches = [_rank_batch(r) for r in range(2)]
    total = sum(int(b[3].sum()) for b in batches)
    all_ent = torch.cat([b[4][b[3]] for b in batches])
    threshold = torch.quantile(all_ent, 1 - Q).item()
    assert batches[0][3].sum() != batches[1][3].sum()  # the ranks differ, so a local statistic would show
    assert all(abs(torch.quantile(b[4][b[3]], 1 - Q).item() - threshold) > 1e-3 for b in batches)
    for r, (lp, old, adv, mask, ent) in enumerate(batches):
        # single process: the same loss needs num_items_in_batch = the global count
        want, _ = grpo_loss(lp, adv, mask, old_logprobs=old, loss_type="dapo", num_items_in_batch=total / 2)
        assert got[r]["loss"] == pytest.approx(want.item(), rel=1e-12)
        assert got[r]["policy_denom"] == pytest.approx(total / 2, rel=1e-12)
        assert got[r]["threshold"] == pytest.approx(threshold, rel=1e-12)
        m_eff = (ent >= threshold) & mask
        assert got[r]["bonus_denom"] == max(int(m_eff.sum()), 1)
        # the policy term also uses the global threshold: local threshold would give another mask
        x = lp.clone()
        pol = -torch.min(torch.exp(x - old) * adv[:, None],
                         torch.exp(x - old).clamp(0.8, 1.2) * adv[:, None]) * m_eff
        want_q = pol.sum() / (total / 2) - 0.1 * (ent * m_eff).sum() / max(int(m_eff.sum()), 1)
        assert got[r]["loss_q"] == pytest.approx(want_q.item(), rel=1e-12)
