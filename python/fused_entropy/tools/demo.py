"""``fused-entropy demo``: entropy collapse under GRPO, and what the entropy-control methods do about it.

The task has very many correct answers, so a policy can be right *and* diverse. A prompt is one token
``x_0`` drawn from the first 16 ids of a vocabulary of ``V = 256``; the policy writes ``L = 6`` more
tokens, and position ``t`` is correct when ``x_t = x_{t-1} + 1 (mod 8)``. The reward is the fraction
of correct positions; an answer is *correct* when every position is. Every token has 32 correct
successors, so each prompt has ``32^6 ~ 1e9`` correct answers and a perfect policy can keep
``log 32 = 3.47`` nats of entropy per token.

The policy is a one-layer GRU over the previous tokens with its own LM head (``[V, H]``, passed to
the loss as ``lin_weight``). Every run trains it with GRPO through :class:`fused_entropy.LinearGRPOLoss`
(group-normalized advantages, 16 prompts x 8 samples per rollout, DAPO token normalization, clip
0.2/0.28, two optimizer steps of 64 sequences per rollout, Adam lr 1e-2), from the same initial
weights, on the same prompts, with the same sampling seeds. The runs:

    grpo      plain GRPO, no entropy term
    static    constant entropy bonus                          StaticEntropyCoef
    adaptive  Skywork-OR1 adaptive coefficient and gate       AdaptiveEntropyCoef(strict=True, start_enabled=True)
    aent      AEnt: clamped entropy (clamp_p) + band rule     AEntCoef, entropy_source="clamped"
    kl_cov    KL-Cov (Cui et al.)                             loss_type="kl_cov"
    repo_r    REPO-R advantage shaping                        REPOZeta + repo_r_advantages

The coefficients are scaled to this task (entropies of a few nats, a few hundred optimizer steps),
not the papers' LLM settings. The controllers step once per optimizer step.

It prints a table (reward, fraction of correct answers and entropy averaged over the last tenth of the
steps, and the number of distinct correct answers in the last batch of 128) and writes
``entropy_demo.png`` (entropy and reward per step, one line per run) and ``entropy_demo.json`` (the
curves) under ``--out``. The entropy is that of the sampling policy, measured the same way for every run.
Every run trains once per seed (seeds 0, 1, 2 by default; ``--seeds`` or ``--seed`` for others) and
the table shows the median over the seeds and the range ``[min-max]``; the plot shows the first seed.

Why a spread and not one seed: RL training amplifies rounding differences, and one seed's table is
not what another CPU prints. The demo computes in float64 on one thread with
``torch.use_deterministic_algorithms(True)``, so one machine reproduces its table bit for bit, but
other vector kernels still change the trajectories: forcing ATen's scalar kernels and MKL's
compatible code path (``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE``) on the same AMD EPYC moved
seed 0's KL-Cov run from 0.000 to 0.196 correct (entropy curves differ from step 0 by ~1e-16 and
diverge to ~1 nat). Claims about a method should hold across the seed range, not on one seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..control import AEntCoef, AdaptiveEntropyCoef, REPOZeta, StaticEntropyCoef, repo_r_advantages

VOCAB = 256
LENGTH = 6
MODULUS = 8
HIDDEN = 64


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------
def rewards(prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Fraction of positions with ``x_t = x_{t-1} + 1 (mod MODULUS)``; prompts ``[B]``, completions ``[B, L]``."""
    seq = torch.cat([prompts[:, None], completions], dim=1)
    ok = (seq[:, 1:] - seq[:, :-1] - 1) % MODULUS == 0
    return ok.float().mean(dim=1)


class TinyPolicy(nn.Module):
    """GRU over the previous tokens -> hidden state ``h_t`` -> logits ``h_t . W^T`` (W = ``lm_head.weight``)."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, inputs: torch.Tensor, state: Optional[torch.Tensor] = None):
        out, state = self.gru(self.embed(inputs), state)
        return self.proj(out), state

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, length: int, generator: torch.Generator):
        """Sample ``[B, length]`` tokens; also return their log-probs and the per-token entropies."""
        tokens, logps, ents = [], [], []
        inp, state = prompts[:, None], None
        for _ in range(length):
            h, state = self.hidden_states(inp, state)
            logits = self.lm_head(h[:, -1])
            logp_all = torch.log_softmax(logits, dim=-1)
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator)
            tokens.append(tok)
            logps.append(logp_all.gather(1, tok))
            ents.append(-(logp_all.exp() * logp_all).sum(-1, keepdim=True))
            inp = tok
        return torch.cat(tokens, 1), torch.cat(logps, 1), torch.cat(ents, 1)


def group_advantages(r: torch.Tensor, group: int) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / (std_group + 1e-4)`` (TRL's default scaling)."""
    g = r.view(-1, group)
    return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)


# --------------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    name: str
    label: str
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    controller: Optional[Callable[[], Any]] = None
    repo: bool = False


def run_specs() -> Dict[str, RunSpec]:
    """The runs, with hyperparameters scaled to this task (entropies of a few nats, a few hundred steps)."""
    specs = [
        RunSpec("grpo", "plain GRPO"),
        RunSpec("static", "static bonus 0.1", controller=lambda: StaticEntropyCoef(0.1)),
        RunSpec("adaptive", "adaptive (Skywork rule), target 2.0",
                controller=lambda: AdaptiveEntropyCoef(target=2.0, delta=0.02, coef_min=0.0, coef_max=0.3,
                                                       init=0.0, strict=True, start_enabled=True)),
        RunSpec("aent", "AEnt clamp_p=0.5, band [2, 3]", loss_kwargs={"clamp_p": 0.5, "entropy_source": "clamped"},
                controller=lambda: AEntCoef(low=2.0, high=3.0, lr=0.005, coef_min=0.02, coef_max=0.2, init=0.08)),
        RunSpec("kl_cov", "KL-Cov k=0.2", loss_kwargs={"loss_type": "kl_cov", "kl_cov_ratio": 0.2,
                                                         "ppo_kl_coef": 1.0}),
        RunSpec("repo_r", "REPO-R target 2.0, zeta <= 0.3",
                controller=lambda: REPOZeta(init=0.01, zeta_max=0.3, target=2.0), repo=True),
    ]
    return {s.name: s for s in specs}


@dataclass
class DemoConfig:
    steps: int = 150
    prompts: int = 16
    group: int = 8
    minibatches: int = 2
    epochs: int = 1
    lr: float = 1e-2
    seed: int = 0
    prompt_pool: int = 16
    dtype: str = "float64"


def _make_loss(spec: RunSpec, controller):
    from .. import LinearGRPOLoss  # imported here: the module is optional at import time of the CLI

    kwargs = dict(beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, temperature=1.0,
                  use_ref_model=False, compiled=False)
    kwargs.update(spec.loss_kwargs)
    if controller is not None:
        kwargs["entropy_controller"] = controller
    return LinearGRPOLoss(**kwargs)


def train_run(spec: RunSpec, cfg: DemoConfig) -> Dict[str, Any]:
    """Train one run; return per-step curves and last-batch statistics."""
    torch.manual_seed(cfg.seed)
    policy = TinyPolicy().to(getattr(torch, cfg.dtype))
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    controller = spec.controller() if spec.controller is not None else None
    loss_fn = _make_loss(spec, controller)
    loss_fn.train()
    gen_prompts = torch.Generator().manual_seed(cfg.seed + 1)
    gen_sample = torch.Generator().manual_seed(cfg.seed + 2)

    curve: Dict[str, List[float]] = {"reward": [], "entropy": [], "coef": [], "correct": []}
    batch = cfg.prompts * cfg.group
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    distinct = 0
    for _ in range(cfg.steps):
        prompts = torch.randint(0, cfg.prompt_pool, (cfg.prompts,), generator=gen_prompts).repeat_interleave(cfg.group)
        completions, old_logps, ents = policy.sample(prompts, LENGTH, gen_sample)
        r = rewards(prompts, completions)
        adv = group_advantages(r, cfg.group)
        if spec.repo:
            adv = repo_r_advantages(adv, old_logps, controller.zeta)
        correct = r == 1.0
        curve["reward"].append(r.mean().item())
        curve["entropy"].append(ents.mean().item())
        curve["correct"].append(correct.float().mean().item())
        curve["coef"].append(controller.zeta if spec.repo else (controller.coef if controller is not None else 0.0))
        distinct = len({tuple(row) for row in torch.cat([prompts[:, None], completions], 1)[correct].tolist()})

        inputs = torch.cat([prompts[:, None], completions[:, :-1]], dim=1)
        perm = torch.cat([torch.randperm(batch, generator=gen_sample) for _ in range(cfg.epochs)])
        for idx in perm.view(cfg.minibatches * cfg.epochs, -1):
            h, _ = policy.hidden_states(inputs[idx])
            loss, _ = loss_fn(h, policy.lm_head.weight, completions[idx], mask[idx], adv[idx],
                              old_per_token_logps=old_logps[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if controller is not None:
                controller.step()
    tail = max(1, cfg.steps // 10)
    return {
        "name": spec.name,
        "label": spec.label,
        "curve": curve,
        "final_reward": sum(curve["reward"][-tail:]) / tail,
        "final_entropy": sum(curve["entropy"][-tail:]) / tail,
        "final_correct": sum(curve["correct"][-tail:]) / tail,
        "distinct_correct": distinct,
        "batch": batch,
    }


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def format_table(results: Sequence[Dict[str, Any]], steps: int) -> str:
    """One line per run. ``results`` holds one entry per (run, seed); with several seeds a cell is the
    median over the seeds and its range ``[min-max]``."""
    tail = max(1, steps // 10)
    by_run: Dict[str, List[Dict[str, Any]]] = {}
    for res in results:
        by_run.setdefault(res["name"], []).append(res)
    seeds = sorted({res.get("seed", 0) for res in results})
    many = len(seeds) > 1
    keys = (("final_reward", "reward", "{:.3f}"), ("final_correct", "correct", "{:.3f}"),
            ("final_entropy", "entropy", "{:.3f}"), ("distinct_correct", "distinct correct", "{:.0f}"))

    def cell(runs, key, fmt):
        vals = sorted(r[key] for r in runs)
        if not many:
            return fmt.format(vals[0])
        return f"{fmt.format(statistics.median(vals))} [{fmt.format(vals[0])}-{fmt.format(vals[-1])}]"

    body = [[runs[0]["name"], runs[0]["label"]] + [cell(runs, k, f) for k, _, f in keys] for runs in by_run.values()]
    heads = ["run", "method"] + [h for _, h, _ in keys]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(heads)]
    line = lambda cells: " ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    batch = results[0]["batch"] if results else 0
    note = (f"final = mean of the last {tail} step(s); distinct correct = distinct correct answers in the last "
            f"batch of {batch}")
    if many:
        note += f"; median [min-max] over seeds {','.join(map(str, seeds))}"
    else:
        note += f"; seed {seeds[0] if seeds else 0}"
    head = line(heads)
    return "\n".join([note, head, "-" * len(head)] + [line(r) for r in body])


def plot(results: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    first = min(res.get("seed", 0) for res in results)
    for res in (r for r in results if r.get("seed", 0) == first):
        axes[0].plot(res["curve"]["entropy"], label=res["label"], lw=1.4)
        axes[1].plot(res["curve"]["reward"], label=res["label"], lw=1.4)
    axes[0].axhline(math.log(VOCAB // MODULUS), color="gray", ls=":", lw=1)
    axes[0].set_title("mean per-token entropy of the sampling policy (nats)")
    axes[1].set_title("mean reward (fraction of correct positions)")
    for ax in axes:
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    specs = run_specs()
    p = argparse.ArgumentParser(prog="fused-entropy demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="rollout steps per run (default %(default)s)")
    p.add_argument("--out", default="entropy_demo", help="output directory for the plot and curves (default %(default)s)")
    p.add_argument("--runs", default=",".join(specs), help="comma-separated subset of: " + ", ".join(specs))
    p.add_argument("--seed", type=int, help="train every run on this one seed only")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: every run once per seed, the table "
                                                    "shows the median and [min-max] over them (default %(default)s)")
    p.add_argument("--dtype", choices=("float64", "float32"), default=DemoConfig.dtype,
                   help="policy and loss dtype (default %(default)s; one machine reproduces its table bit for bit)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown or not names:
        p.error(f"--runs: unknown run(s) {unknown}; choose from {', '.join(specs)}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    try:
        seeds = [args.seed] if args.seed is not None else [int(t) for t in args.seeds.split(",") if t.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds names no seed")

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for seed in seeds:
            cfg = DemoConfig(steps=args.steps, seed=seed, dtype=args.dtype)
            for name in names:
                t0 = time.perf_counter()
                res = train_run(specs[name], cfg)
                res["seconds"] = time.perf_counter() - t0
                res["seed"] = seed
                print(f"{name:<10} seed {seed} done in {res['seconds']:.1f} s", flush=True)
                results.append(res)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    print()
    print(format_table(results, args.steps))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "entropy_demo.png")
    plot(results, png)
    config = dict(DemoConfig(steps=args.steps, dtype=args.dtype).__dict__, seeds=seeds, threads=args.threads)
    config.pop("seed")
    with open(os.path.join(args.out, "entropy_demo.json"), "w") as f:
        json.dump({"config": config, "runs": results}, f)
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
