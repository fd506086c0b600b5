"""Entropy controllers and advantage shaping (fused_entropy.control) against hand-computed values."""
import json
import math

import pytest
import torch

from fused_entropy.control import (
    AdaptiveClip,
    AdaptiveEntropyCoef,
    AEntCoef,
    REPOZeta,
    StaticEntropyCoef,
    entropy_advantages,
    repo_r_advantages,
)


def run(ctrl, entropies, tokens=10):
    """Feed one window per entropy value; return the coefficient/value/gate seen after each step."""
    seen = []
    for h in entropies:
        if h is not None:
            ctrl.observe(h * tokens, tokens)
        ctrl.step()
        seen.append((ctrl.coef, ctrl.value, ctrl.enabled))
    return seen


def approx_seq(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[0] == pytest.approx(w[0], rel=1e-12, abs=1e-15)
        assert g[1] == pytest.approx(w[1], rel=1e-12, abs=1e-15)
        assert g[2] == w[2]


# --------------------------------------------------------------------------------------------------
# update sequences
# --------------------------------------------------------------------------------------------------
def test_static_constant_and_tracks_entropy():
    c = StaticEntropyCoef(0.01)
    assert c.coef == 0.01 and c.enabled
    run(c, [0.5, 3.0, None])
    assert c.coef == 0.01
    assert c.last_entropy == pytest.approx(3.0)
    assert c.num_steps == 2


def test_adaptive_trl_rule_and_gate():
    # TRL defaults: <=, gate starts off (last entropy = +inf), so the first window has no bonus.
    c = AdaptiveEntropyCoef(target=0.2, delta=0.005, coef_min=0.0, coef_max=0.012, init=0.0)
    assert (c.coef, c.value, c.enabled) == (0.0, 0.0, False)
    seen = run(c, [0.5, 0.1, 0.2, 0.1, 0.05, 0.3, 0.3, 0.3])
    approx_seq(seen, [
        (0.0, 0.0, False),     # above target: value at coef_min already, gate stays off
        (0.005, 0.005, True),  # below: value up, gate on
        (0.01, 0.01, True),    # exactly at target counts as below (<=)
        (0.012, 0.012, True),  # capped at coef_max
        (0.012, 0.012, True),
        (0.0, 0.007, False),   # above: value down, gate off -> coef 0 although value > 0
        (0.0, 0.002, False),
        (0.0, 0.0, False),     # floored at coef_min
    ])


def test_adaptive_first_window_trl_vs_skywork():
    trl = AdaptiveEntropyCoef(target=0.2, delta=0.01, init=0.3)
    sky = AdaptiveEntropyCoef(target=0.2, delta=0.01, init=0.3, strict=True, start_enabled=True)
    # Before the first step: TRL applies no bonus, Skywork's code applies init.
    assert trl.coef == 0.0 and trl.value == 0.3
    assert sky.coef == 0.3
    # Entropy exactly at the target: TRL counts it as below (<=), Skywork's strict < does not.
    trl.observe(2.0, 10)
    sky.observe(2.0, 10)
    trl.step()
    sky.step()
    assert trl.enabled and trl.coef == pytest.approx(0.31)
    assert not sky.enabled and sky.coef == 0.0 and sky.value == pytest.approx(0.29)


def test_adaptive_matches_trl_trainer_rule():
    """Restatement of TRL 1.16 GRPOTrainer's adaptive block over a random entropy sequence."""
    g = torch.Generator().manual_seed(0)
    ents = (torch.rand(40, generator=g, dtype=torch.float64) * 0.4).tolist()
    target, delta, lo, hi = 0.2, 0.005, 0.0, 0.02
    ctrl = AdaptiveEntropyCoef(target=target, delta=delta, coef_min=lo, coef_max=hi, init=0.0)
    coef, last = 0.0, float("inf")
    for h in ents:
        applied = coef if last <= target else 0.0
        assert ctrl.coef == applied
        ctrl.observe(h * 7, 7)
        ctrl.step()
        world = (h * 7) / 7
        coef = min(coef + delta, hi) if world <= target else max(coef - delta, lo)
        last = world
    assert ctrl.value == coef


def test_aent_band_warmup_bounds():
    c = AEntCoef(low=1.0, high=2.0, lr=0.1, coef_min=0.0, coef_max=0.5, init=0.2, warmup=2)
    assert c.coef == 0.2 and c.enabled
    seen = run(c, [0.0, None, 0.0, 0.5, 1.5, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    want = [0.2, 0.2,   # warm-up window 1; the empty window does not count
            0.2,        # warm-up window 2
            0.25,       # 0.2 - 0.1 * (0.5 - 1.0)
            0.25,       # inside the band: no change
            0.05,       # 0.25 - 0.1 * (4.0 - 2.0)
            0.0,        # 0.05 - 0.3 clipped at coef_min
            0.1, 0.2, 0.3, 0.4, 0.5, 0.5]   # 0.1 per window below the band, capped at coef_max
    approx_seq(seen, [(w, w, True) for w in want])


def test_aent_reg_pulls_to_init():
    c = AEntCoef(low=0.0, high=10.0, lr=0.5, coef_min=0.0, coef_max=1.0, init=0.2, reg=0.4)
    c._value = 0.6  # as if it had drifted up
    run(c, [1.0])   # inside the band: only the pull toward init acts
    assert c.coef == pytest.approx(0.6 - 0.5 * 0.4 * (0.6 - 0.2))


def test_aent_no_warmup_updates_first_window():
    c = AEntCoef(low=1.0, high=2.0, lr=0.1, coef_min=0.0, coef_max=1.0, init=0.2)
    run(c, [0.0])
    assert c.coef == pytest.approx(0.3)


def test_repo_zeta_doubling_halving_default_target():
    c = REPOZeta(init=0.01, zeta_min=0.005, zeta_max=0.04)
    assert c.target is None and c.zeta == 0.01 and c.coef == 0.0
    seen = run(c, [1.0, 0.5, 0.4, 0.3, 2.0, 1.0, 3.0, 3.0, 3.0])
    want = [0.01,   # first window sets target = 1.0, zeta unchanged
            0.02, 0.04, 0.04,   # below target: doubled, capped
            0.02,   # above: halved
            0.02,   # equal: unchanged
            0.01, 0.005, 0.005]  # halved, floored
    approx_seq(seen, [(0.0, w, True) for w in want])
    assert c.target == 1.0


def test_repo_zeta_explicit_target():
    c = REPOZeta(init=0.01, target=0.5)
    run(c, [1.0])
    assert c.zeta == 0.005 and c.target == 0.5


def test_adaptive_clip_rule():
    c = AdaptiveClip(epsilon_high=0.28, delta=0.05, epsilon_high_min=0.2, epsilon_high_max=0.4, target=1.0)
    seen = run(c, [0.5, 0.5, 0.5, 2.0, 1.0, 3.0, 3.0])
    want = [0.33, 0.38, 0.4, 0.35, 0.35, 0.3, 0.25]
    approx_seq(seen, [(0.0, w, True) for w in want])
    assert c.epsilon_high == pytest.approx(0.25)
    d = AdaptiveClip()
    run(d, [1.3, 0.2])
    assert d.target == pytest.approx(1.3) and d.epsilon_high == pytest.approx(0.29)


def test_empty_window_keeps_state_and_never_nan():
    c = AdaptiveEntropyCoef(target=0.2, delta=0.005, init=0.0)
    run(c, [0.1])
    before = c.state_dict()
    c.observe(0.0, 0)           # a micro-batch with no valid tokens
    c.observe(torch.tensor(0.0), torch.tensor(0.0))
    assert c.step() is None
    assert c.state_dict() == before
    assert not math.isnan(c.coef)
    r = REPOZeta(init=0.01)
    assert r.step() is None and r.target is None and r.zeta == 0.01


# --------------------------------------------------------------------------------------------------
# gradient accumulation: the window mean is token-weighted over micro-batches
# --------------------------------------------------------------------------------------------------
def _controllers():
    return [
        AdaptiveEntropyCoef(target=0.55, delta=0.01, init=0.05),
        AEntCoef(low=0.6, high=0.9, lr=0.2, coef_min=0.0, coef_max=1.0, init=0.1),
        REPOZeta(init=0.01, target=0.55),
        AdaptiveClip(target=0.55),
        StaticEntropyCoef(0.02),
    ]


@pytest.mark.parametrize("idx", range(5), ids=["adaptive", "aent", "repo", "clip", "static"])
def test_grad_accumulation_invariance(idx):
    g = torch.Generator().manual_seed(idx)
    # Four micro-batches with very different token counts: the mean of micro-batch means (0.7) is on
    # the other side of the targets (0.55) than the token-weighted mean (0.5).
    ent = torch.rand(4, 16, generator=g, dtype=torch.float64) * 0.02
    ent[0] += 0.99   # row 0: 2 valid tokens at ~1.0
    ent[1:] += 0.49  # rows 1-3: ~0.5
    lengths = [2, 16, 16, 16]
    mask = torch.zeros(4, 16, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    mean_of_means = sum(float((ent[i] * mask[i]).sum() / mask[i].sum()) for i in range(4)) / 4
    assert mean_of_means > 0.55

    acc, whole = _controllers()[idx], _controllers()[idx]
    for step in range(3):
        for i in range(4):
            acc.observe((ent[i] * mask[i]).sum(), mask[i].sum())
        acc.step()
        whole.observe((ent * mask).sum(), mask.sum())
        whole.step()
        assert acc.coef == pytest.approx(whole.coef, rel=1e-12, abs=1e-15)
        assert acc.value == pytest.approx(whole.value, rel=1e-12, abs=1e-15)
        assert acc.enabled == whole.enabled
        assert acc.last_entropy == pytest.approx(float((ent * mask).sum() / mask.sum()), rel=1e-12)
        assert acc.last_entropy < 0.55


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("idx", range(5), ids=["adaptive", "aent", "repo", "clip", "static"])
def test_checkpoint_round_trip_mid_run(idx):
    g = torch.Generator().manual_seed(100 + idx)
    ents = (torch.rand(24, generator=g, dtype=torch.float64) * 1.2).tolist()
    a = _controllers()[idx]
    for h in ents[:10]:
        a.observe(h * 5, 5)
        a.step()
    a.observe(ents[10] * 3, 3)  # a window left open at save time
    sd = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    b = _controllers()[idx]
    b.load_state_dict(sd)
    assert b.state_dict() == a.state_dict()
    for h in ents[11:]:
        for c in (a, b):
            c.observe(h * 5, 5)
            c.step()
        assert (b.coef, b.value, b.enabled, b.last_entropy) == (a.coef, a.value, a.enabled, a.last_entropy)


def test_checkpoint_before_first_window_and_gate():
    a = AdaptiveEntropyCoef(init=0.1)
    b = AdaptiveEntropyCoef(init=0.0, start_enabled=True)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    assert (b.coef, b.value, b.enabled, b.last_entropy) == (0.0, 0.1, False, None)
    r = REPOZeta(init=0.01)
    r2 = REPOZeta(init=0.01)
    r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
    run(r, [0.7]), run(r2, [0.7])
    assert r2.target == r.target == 0.7


def test_load_wrong_controller_raises():
    with pytest.raises(ValueError, match="AEntCoef"):
        AEntCoef(0.1, 0.2, 0.1, 0.0, 1.0, 0.1).load_state_dict(AdaptiveEntropyCoef().state_dict())
    sd = AdaptiveEntropyCoef().state_dict()
    del sd["enabled"]
    with pytest.raises(ValueError, match="enabled"):
        AdaptiveEntropyCoef().load_state_dict(sd)


# --------------------------------------------------------------------------------------------------
# advantage shaping
# --------------------------------------------------------------------------------------------------
def test_repo_r_advantages_formula():
    adv = torch.tensor([2.0, -1.0, 0.0, -3.0], dtype=torch.float64)
    lp = torch.tensor([[-0.5, -30.0, float("-inf")],
                       [-0.5, -30.0, 0.0],
                       [-1.0, -2.0, -3.0],
                       [-10.0, -1.0, -0.1]], dtype=torch.float64)
    z = 0.05
    out = repo_r_advantages(adv, lp, z)
    want = torch.tensor([[2.0 * (1 + 0.025), 2.0 * (1 + 1.0), 2.0 * (1 + 1.0)],   # lp floored at -20
                         [-1.0 * (1 - 0.025), -1.0 * (1 - 1.0), -1.0],
                         [0.0, 0.0, 0.0],
                         [-3.0 * (1 - 0.5), -3.0 * (1 - 0.05), -3.0 * (1 - 0.005)]], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=0)
    # The clamp at 0 binds for a large zeta: A < 0 never turns positive.
    big = repo_r_advantages(torch.tensor([-1.0]), torch.tensor([[-20.0]]), 0.1)
    assert big.item() == 0.0
    # [B, T] advantages, gradients stopped.
    a2 = torch.randn(2, 3, requires_grad=True)
    l2 = torch.randn(2, 3).clamp(max=0).requires_grad_()
    o2 = repo_r_advantages(a2, l2, torch.tensor(0.01))
    assert not o2.requires_grad and o2.shape == (2, 3)
    assert torch.equal(repo_r_advantages(a2, l2, 0.0), a2.detach())


def test_entropy_advantages_formula():
    adv = torch.tensor([1.0, -1.0, 0.0])
    ent = torch.tensor([[0.5, 2.0], [0.5, 2.0], [3.0, 3.0]], requires_grad=True)
    out = entropy_advantages(adv, ent, alpha=0.4, kappa=2.0)
    want = torch.tensor([[1.0 + 0.2, 1.0 + 0.5], [-1.0 + 0.2, -1.0 + 0.5], [0.0, 0.0]])
    torch.testing.assert_close(out, want, rtol=1e-7, atol=0)
    assert not out.requires_grad
    out2 = entropy_advantages(torch.full((3, 2), -2.0), ent, alpha=1.0, kappa=4.0)
    torch.testing.assert_close(out2, torch.tensor([[-1.5, -1.5], [-1.5, -1.5], [-1.5, -1.5]]))


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_observation_raises_and_keeps_state(bad):
    c = AdaptiveEntropyCoef(init=0.0)
    c.observe(1.0, 10)
    with pytest.raises(ValueError, match="entropy_sum"):
        c.observe(bad, 10)
    with pytest.raises(ValueError, match="entropy_sum"):
        c.observe(torch.tensor(bad), 10)
    with pytest.raises(ValueError, match="token_count"):
        c.observe(1.0, bad)
    assert c.step() == pytest.approx(0.1)


def test_bad_observations():
    c = StaticEntropyCoef(0.0)
    with pytest.raises(ValueError, match="token_count"):
        c.observe(1.0, -1)
    with pytest.raises(ValueError, match="entropy_sum"):
        c.observe(1.0, 0)
    with pytest.raises(ValueError, match="entropy_sum"):
        c.observe(torch.ones(2), 2)
    with pytest.raises(TypeError, match="entropy_sum"):
        c.observe("1.0", 2)


@pytest.mark.parametrize("make,match", [
    (lambda: AdaptiveEntropyCoef(coef_min=0.5, coef_max=0.1, init=0.2), "coef_min"),
    (lambda: AdaptiveEntropyCoef(delta=-0.1), "delta"),
    (lambda: AdaptiveEntropyCoef(init=2.0), "init"),
    (lambda: AdaptiveEntropyCoef(target=float("nan")), "target"),
    (lambda: AEntCoef(low=0.3, high=0.2, lr=0.1, coef_min=0.0, coef_max=1.0, init=0.1), "low"),
    (lambda: AEntCoef(low=0.1, high=0.2, lr=-0.1, coef_min=0.0, coef_max=1.0, init=0.1), "lr"),
    (lambda: AEntCoef(low=0.1, high=0.2, lr=0.1, coef_min=0.5, coef_max=0.1, init=0.1), "coef_min"),
    (lambda: AEntCoef(low=0.1, high=0.2, lr=0.1, coef_min=0.0, coef_max=1.0, init=0.1, warmup=-1), "warmup"),
    (lambda: AEntCoef(low=0.1, high=0.2, lr=0.1, coef_min=0.0, coef_max=1.0, init=0.1, reg=-1.0), "reg"),
    (lambda: REPOZeta(init=0.01, zeta_min=0.0), "zeta_min"),
    (lambda: REPOZeta(init=0.01, zeta_min=0.1, zeta_max=0.05), "zeta_min"),
    (lambda: REPOZeta(init=0.5), "init"),
    (lambda: AdaptiveClip(delta=-0.01), "delta"),
    (lambda: AdaptiveClip(epsilon_high_min=0.0), "epsilon_high_min"),
    (lambda: AdaptiveClip(epsilon_high_min=0.3, epsilon_high_max=0.2, epsilon_high=0.25), "epsilon_high_min"),
    (lambda: AdaptiveClip(epsilon_high=0.9), "epsilon_high"),
    (lambda: StaticEntropyCoef(float("inf")), "coef"),
    (lambda: repo_r_advantages(torch.ones(2), torch.zeros(2, 3), -0.1), "zeta"),
    (lambda: repo_r_advantages(torch.ones(3), torch.zeros(2, 3), 0.1), "advantages"),
    (lambda: repo_r_advantages(torch.ones(2, 4), torch.zeros(2, 3), 0.1), "advantages"),
    (lambda: repo_r_advantages(torch.ones(2), torch.zeros(6), 0.1), "logprobs"),
    (lambda: entropy_advantages(torch.ones(2), torch.zeros(2, 3), kappa=0.0), "kappa"),
    (lambda: entropy_advantages(torch.ones(2), torch.zeros(2, 3), alpha=-1.0), "alpha"),
    (lambda: entropy_advantages(torch.ones(2, 3, 1), torch.zeros(2, 3)), "advantages"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_types():
    with pytest.raises(TypeError, match="coef_max"):
        AdaptiveEntropyCoef(coef_max="1")
    with pytest.raises(TypeError, match="warmup"):
        AEntCoef(0.1, 0.2, 0.1, 0.0, 1.0, 0.1, warmup=1.5)
    with pytest.raises(TypeError, match="advantages"):
        repo_r_advantages(torch.ones(2, dtype=torch.long), torch.zeros(2, 3), 0.1)


def test_grad_accumulation_through_grpo_loss():
    """The loss feeds the controller: 4 micro-batch calls then step() == one call on all tokens."""
    from fused_entropy import grpo_loss

    g = torch.Generator().manual_seed(7)
    b, t = 8, 5
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    ent = torch.rand(b, t, generator=g, dtype=torch.float64)
    ent[:2] += 1.0  # the first micro-batch has few tokens of high entropy
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:2, 1:] = False
    mask[5, 3:] = False
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    target = float((ent * mask).sum() / mask.sum())

    acc = AdaptiveEntropyCoef(target=target + 1e-9, delta=0.01, init=0.05)
    whole = AdaptiveEntropyCoef(target=target + 1e-9, delta=0.01, init=0.05)
    for rows in torch.arange(b).view(4, 2):
        grpo_loss(lp[rows].requires_grad_(), adv[rows], mask[rows], entropy=ent[rows].requires_grad_(),
                  entropy_controller=acc)
    grpo_loss(lp.clone().requires_grad_(), adv, mask, entropy=ent.clone().requires_grad_(), entropy_controller=whole)
    acc.step()
    whole.step()
    assert acc.last_entropy == pytest.approx(target, rel=1e-12)
    assert (acc.value, acc.enabled) == (whole.value, whole.enabled) == (pytest.approx(0.06), True)
    # The mean of the micro-batch means is above the target: a per-micro-batch rule would disagree.
    per_mb = [float((ent[r] * mask[r]).sum() / mask[r].sum()) for r in torch.arange(b).view(4, 2)]
    assert sum(per_mb) / 4 > target + 1e-9
