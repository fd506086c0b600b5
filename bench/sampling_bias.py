"""The importance-ratio bias that sampling truncation puts into RL, with and without the replay.

A simulated policy (logits ~ N(0, sigma^2) over V tokens, the same on the sampler and the trainer, so
every ratio should be 1) is sampled under vLLM-style truncation; the sampler reports processed
(truncated, renormalized) log-probs, as vLLM with ``logprobs_mode="processed_logprobs"`` does. The
trainer recomputes the token's log-prob either over the full vocabulary (the bias: the ratio is the
kept mass S) or with ``linear_logprobs(..., sampling_*)`` (the replay: the ratio is 1).

    python bench/sampling_bias.py [--tokens 4096] [--vocab 32768] [--sigma 4]
"""
from __future__ import annotations

import argparse

import torch

from fused_entropy import linear_logprobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=4.0, help="standard deviation of the logits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.hidden, generator=g, dtype=torch.float64)
    w = torch.randn(args.vocab, args.hidden, generator=g, dtype=torch.float64) * (args.sigma / args.hidden ** 0.5)
    settings = [dict(sampling_top_k=50), dict(sampling_top_k=20, sampling_top_p=0.95), dict(sampling_top_p=0.9),
                dict(sampling_min_p=0.05), dict(sampling_top_k=50, sampling_top_p=0.9, sampling_min_p=0.05)]
    print(f"simulated policy: N={args.tokens} tokens, V={args.vocab}, logits ~ N(0, {args.sigma}^2), fp64, seed {args.seed}")
    print("ratio = exp(trainer logp - sampler processed logp), same weights (the true ratio is 1)")
    print(f"{'truncation':45s} {'kept tokens':>11s} {'ratio, full-V logp':>19s} {'ratio, replayed':>16s}")
    for kw in settings:
        # sample from the truncated distribution: the replay's own log-probs over every token id
        probe = linear_logprobs(x, w, torch.zeros(args.tokens, dtype=torch.long), entropy=False, **kw)
        z = x @ w.T
        # kept set of each row: logits >= the row's threshold, found as the smallest kept logit
        lkm = probe.log_kept_mass
        p = torch.softmax(z, -1)
        order = torch.sort(z, -1, descending=True)
        cum = torch.cumsum(order.values.softmax(-1), -1)
        n_kept = (cum < lkm.exp()[:, None] * (1 - 1e-12)).sum(-1) + 1
        thresh = order.values.gather(1, (n_kept - 1)[:, None])
        q = torch.where(z >= thresh, p, torch.zeros_like(p))
        y = torch.multinomial(q / q.sum(-1, keepdim=True), 1, generator=g).squeeze(1)
        st = linear_logprobs(x, w, y, entropy=False, **kw)
        processed = st.truncated_logprobs  # what vLLM reports (same weights)
        full_ratio = torch.exp(st.logprobs - processed)
        replay_ratio = torch.exp(st.truncated_logprobs - processed)
        name = ", ".join(f"{k[9:]}={v}" for k, v in kw.items())
        print(f"{name:45s} {n_kept.double().median().item():11.0f} {full_ratio.mean().item():19.3f} "
              f"{replay_ratio.mean().item():16.3f}")


if __name__ == "__main__":
    main()
