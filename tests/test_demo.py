"""Smoke test of `fused-entropy demo`: a few steps of every run through LinearGRPOLoss."""
import json
import math

import torch

from fused_entropy.tools import demo


def test_rewards_and_group_advantages():
    prompts = torch.tensor([3, 250])
    comp = torch.tensor([[4, 13, 6, 23, 0, 9],     # +1 mod 8 at every position
                         [251, 252, 0, 1, 2, 3]])  # 251 = 250 + 1; 252 ok; 0 != 253 mod 8; then 1, 2, 3 ok
    r = demo.rewards(prompts, comp)
    torch.testing.assert_close(r, torch.tensor([1.0, 5 / 6]))
    adv = demo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group=2)
    assert adv[0] > 0 > adv[1] and adv[2] == adv[3] == 0


def test_demo_smoke(tmp_path, capsys):
    names = list(demo.run_specs())
    assert names == ["grpo", "static", "adaptive", "aent", "kl_cov", "repo_r"]
    assert demo.main(["--steps", "3", "--seed", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("run "):]
    for name in names:
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    assert (tmp_path / "entropy_demo.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "entropy_demo.json").read_text())
    assert [r["name"] for r in data["runs"]] == names
    for r in data["runs"]:
        for key in ("reward", "entropy", "coef", "correct"):
            assert len(r["curve"][key]) == 3 and all(math.isfinite(v) for v in r["curve"][key])
        assert 0.0 <= r["final_reward"] <= 1.0 and 0.0 <= r["final_entropy"] <= math.log(demo.VOCAB) + 1e-4
    # Same seeds and budget: every run starts from the same policy and the same first batch.
    first = {r["curve"]["entropy"][0] for r in data["runs"]}
    assert len(first) == 1


def test_demo_rejects_unknown_run(capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--runs", "grpo,nope"])
    assert "nope" in capsys.readouterr().err


def test_demo_seed_spread_and_restored_state(tmp_path, capsys):
    """--seeds: one training per (run, seed), median [min-max] cells; the process's torch settings come back."""
    threads = torch.get_num_threads()
    assert demo.main(["--steps", "2", "--runs", "grpo,static", "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "median [min-max] over seeds 0,1" in out
    table = out[out.index("median [min-max]"):]
    row = next(line for line in table.splitlines() if line.startswith("grpo "))
    assert row.count("[") == 4 and row.count("-") >= 4
    data = json.loads((tmp_path / "entropy_demo.json").read_text())
    assert [(r["name"], r["seed"]) for r in data["runs"]] == [("grpo", 0), ("static", 0), ("grpo", 1), ("static", 1)]
    assert data["config"]["dtype"] == "float64" and data["config"]["seeds"] == [0, 1]
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_demo_run_is_reproducible():
    """The same seed gives the same curves, bit for bit (float64, one thread, deterministic algorithms)."""
    spec = demo.run_specs()["kl_cov"]
    cfg = demo.DemoConfig(steps=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = demo.train_run(spec, cfg), demo.train_run(spec, cfg)
    finally:
        torch.set_num_threads(threads)
    assert a["curve"] == b["curve"]
