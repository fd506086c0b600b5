"""Two gloo processes: every rank holds the coefficient computed from the global token-weighted mean."""
import pytest
import torch
import torch.distributed as dist

from fused_entropy.control import AdaptiveEntropyCoef, REPOZeta

from _dist_utils import run_ranks

# Per rank and step: (entropy_sum, token_count) of each micro-batch.
# Step 1: rank 0 has 10 tokens at 0.1, rank 1 has 30 tokens at 0.5 -> global mean 16/40 = 0.4, while
#         the mean of the rank means is 0.3 and each rank alone would decide differently.
# Step 2: rank 1 observes nothing -> global mean 0.1 from rank 0 alone.
# Step 3: nothing anywhere -> state unchanged.
OBS = {
    0: [[(0.5, 5), (0.5, 5)], [(1.0, 10)], []],
    1: [[(15.0, 30)], [], []],
}


def _worker(rank, world):
    adaptive = AdaptiveEntropyCoef(target=0.35, delta=0.01, coef_min=0.0, coef_max=1.0, init=0.1)
    repo = REPOZeta(init=0.01)
    record = []
    for window in OBS[rank]:
        for s, n in window:
            # Tensor observations on one rank, floats on the other: both must reduce the same way.
            if rank == 0:
                s, n = torch.tensor(s), torch.tensor(float(n))
            adaptive.observe(s, n)
            repo.observe(s, n)
        means = (adaptive.step(), repo.step())
        record.append({"means": list(means), "adaptive": adaptive.state_dict(), "repo": repo.state_dict(),
                       "coef": adaptive.coef})
    return record


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_same_coefficient_from_global_mean(tmp_path):
    r0, r1 = run_ranks(_worker, 2, tmp_path)
    assert r0 == r1

    s1, s2, s3 = r0
    # Step 1: global mean 0.4 > 0.35 -> value down, gate off (rank 0 alone, 0.1, would have turned it on).
    assert s1["means"][0] == pytest.approx(0.4, rel=1e-12)
    assert s1["adaptive"]["value"] == pytest.approx(0.09) and s1["adaptive"]["enabled"] is False
    assert s1["coef"] == 0.0
    assert s1["repo"]["target"] == pytest.approx(0.4) and s1["repo"]["value"] == 0.01
    # Step 2: only rank 0 observed; the global mean is its 0.1 -> value up, gate on, zeta doubled.
    assert s2["means"][0] == pytest.approx(0.1, rel=1e-12)
    assert s2["adaptive"]["value"] == pytest.approx(0.1) and s2["coef"] == pytest.approx(0.1)
    assert s2["repo"]["value"] == pytest.approx(0.02)
    # Step 3: an empty window on every rank leaves everything unchanged.
    assert s3["means"] == [None, None]
    assert s3["adaptive"] == s2["adaptive"] and s3["repo"] == s2["repo"]
