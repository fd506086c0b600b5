"""GRPO-family losses written straight from MATH.md sections 4-6, token by token: the spec.

Slow on purpose (Python loops over tokens, one scalar at a time) so that every line can be checked
against the tables of MATH.md. Pass fp64 tensors for a gold result; autograd gives the gradients.
Single process only (``world_size = 1``). Never edit this file to agree with the fast implementation.

Conventions the tables leave open, fixed here as the package defines them:
- entries outside the mask take no part in anything, except in luspo with Liger's normalization, which
  weights every position of a row by that row's token count (as Liger 0.8.5 does); there a masked
  position whose inputs are not finite counts as ``logp = old = ref = 0``.
- Clip-Cov and KL-Cov follow verl ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``:
  Clip-Cov candidates are taken in row-major order and drawn with ``torch.randperm(n, generator)``;
  a drawn token's loss is multiplied by 0 (no value and no gradient) and stays in the denominator.
- vespo adds ``log(is_ratio)`` of every position of the row (masked or not) to ``log w_seq``, as
  Liger/TRL ``get_gamma_weights`` do; a per-sequence ratio (``[B]`` or ``[B, 1]``) is added once.
- clip-ratio metrics: PPO-clip types count ``r < 1-eps_low, A < 0`` (low) and ``r > 1+eps_high, A > 0``
  (high) with ``r`` before ``delta``; cispo counts ``r > eps_high, A > 0`` as high (Liger); sapo, vespo
  and kl_cov clip nothing.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _ratio_row(lp, old, valid, b, t_len, sequence):
    """log importance weight w[b, t] for every t (MATH.md section 4)."""
    log_r = [lp[b, t] - old[b, t] for t in range(t_len)]
    if not sequence:
        return log_r, log_r
    n = sum(1 for t in range(t_len) if valid[b, t])
    total = sum((log_r[t] for t in range(t_len) if valid[b, t]), torch.zeros((), dtype=lp.dtype))
    w = total / max(n, 1)
    return log_r, [w] * t_len


def _vespo_phi_row(log_r, valid_row, is_row, a, k_pos, lam_pos, k_neg, lam_neg):
    low, high = math.log(1e-8), 20.0
    s = 0.0
    for t, lr in enumerate(log_r):
        if valid_row[t]:
            s += min(max(float(lr), -20.0), 20.0)
    if is_row is not None:
        for v in is_row:
            s += min(max(math.log(float(v)) if float(v) > 0 else -math.inf, low), high)
    log_w = min(max(s, low), high)
    w = math.exp(log_w)
    k, lam = (k_pos, lam_pos) if a >= 0 else (k_neg, lam_neg)
    lam = max(lam, 1e-4)
    try:
        phi = math.exp(lam + k * log_w - lam * w)
    except OverflowError:
        phi = 0.0
    return phi if math.isfinite(phi) else 0.0


def grpo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    clamped_entropy: Optional[torch.Tensor] = None,
    entropy_source: str = "full",
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: Optional[float] = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = False,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    max_completion_length: Optional[int] = None,
    num_items_in_batch=None,
    is_ratio: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    luspo_normalization: str = "liger",
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
    generator: Optional[torch.Generator] = None,
    bonus_normalization: str = "auto",
):
    """Reference for ``fused_entropy.grpo_loss`` (same arguments; ``entropy_coef`` is the coefficient)."""
    B, T = logprobs.shape
    dt = logprobs.dtype
    lp = logprobs
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(dt)
    ref = None if ref_logprobs is None else ref_logprobs.to(dt)
    valid = mask.bool()
    A = advantages.to(dt)
    A = A.reshape(B, 1).expand(B, T) if A.numel() == B else A
    isr = None
    isr_per_row = is_ratio is not None and is_ratio.numel() == B and T != 1
    if is_ratio is not None:
        isr = is_ratio.to(dt).reshape(B, -1).expand(B, T) if is_ratio.numel() == B else is_ratio.to(dt)
    luspo_liger = loss_type == "luspo" and luspo_normalization == "liger"
    zero = torch.zeros((), dtype=dt)

    def counted(b, t):
        """Positions that enter the policy sum (all of them for luspo-liger)."""
        return bool(valid[b, t]) or luspo_liger

    def val(x, b, t):
        if x is None:
            return None
        if not valid[b, t]:
            inputs = [lp[b, t], old[b, t]] + ([ref[b, t]] if (ref is not None and beta != 0.0) else [])
            if not all(bool(torch.isfinite(v)) for v in inputs):
                return zero
        return x[b, t]

    # ---- 80/20 mask (section 5) ---------------------------------------------------------
    H_bonus = entropy if entropy_source == "full" else clamped_entropy
    keep = [[bool(valid[b, t]) for t in range(T)] for b in range(B)]
    if top_entropy_quantile < 1.0:
        vals = torch.stack([H_bonus[b, t].detach() for b in range(B) for t in range(T) if valid[b, t]]) \
            if bool(valid.any()) else None
        if vals is None:
            keep = [[False] * T for _ in range(B)]
        else:
            thr = torch.quantile(vals, 1.0 - top_entropy_quantile)
            keep = [[bool(valid[b, t]) and bool(H_bonus[b, t].detach() >= thr) for t in range(T)] for b in range(B)]

    # ---- Cov statistics over valid tokens (section 6) --------------------------------------
    n_valid = int(valid.sum())
    selected = set()
    if loss_type in ("clip_cov", "kl_cov") and n_valid > 0:
        cells = [(b, t) for b in range(B) for t in range(T) if valid[b, t]]
        mean_a = sum(float(A[b, t]) for b, t in cells) / n_valid
        mean_lp = sum(float(lp[b, t].detach()) for b, t in cells) / n_valid
        cov = {(b, t): (float(A[b, t]) - mean_a) * (float(lp[b, t].detach()) - mean_lp) for b, t in cells}
        if loss_type == "clip_cov":
            cand = []
            for b, t in cells:
                r = math.exp(float(lp[b, t].detach()) - float(old[b, t]))
                a = float(A[b, t])
                unclipped = -a * r
                clipped = -a * min(max(r, 1 - epsilon_low), 1 + epsilon_high)
                if clipped > unclipped:  # the PPO clip already acts on this token
                    continue
                if clip_cov_lb < cov[(b, t)] < clip_cov_ub:
                    cand.append((b, t))
            want = max(int(clip_cov_ratio * n_valid), 1)
            if cand:
                perm = torch.randperm(len(cand), generator=generator)
                selected = {cand[int(i)] for i in perm[: min(want, len(cand))]}
        else:
            want = max(1, int(n_valid * kl_cov_ratio))
            order = sorted(cells, key=lambda c: -cov[c])
            selected = set(order[:want])

    # ---- per-token loss (section 4) -------------------------------------------------------
    ell = [[zero for _ in range(T)] for _ in range(B)]
    kl_tok = [[zero for _ in range(T)] for _ in range(B)]
    low = [[False] * T for _ in range(B)]
    high = [[False] * T for _ in range(B)]
    for b in range(B):
        lp_row = [val(lp, b, t) for t in range(T)]
        old_row = [val(old, b, t) for t in range(T)]
        log_r = [lp_row[t] - old_row[t] for t in range(T)]
        if importance_sampling_level == "sequence":
            n = sum(1 for t in range(T) if valid[b, t])
            w_seq = sum((log_r[t] for t in range(T) if valid[b, t]), zero) / max(n, 1)
            w = [w_seq] * T
        else:
            w = log_r
        for t in range(T):
            if not counted(b, t):
                continue
            a = A[b, t]
            r = torch.exp(w[t])
            if loss_type in CLIPPED or loss_type == "clip_cov":
                r_clip = torch.clamp(r, 1 - epsilon_low, 1 + epsilon_high)
                r1 = torch.clamp(r, max=delta) if (delta is not None and loss_type != "clip_cov") else r
                l = -torch.minimum(r1 * a, r_clip * a)
                if (b, t) in selected:
                    l = l * 0.0
                low[b][t] = bool(r < 1 - epsilon_low) and bool(a < 0)
                high[b][t] = bool(r > 1 + epsilon_high) and bool(a > 0)
            elif loss_type == "cispo":
                l = -torch.clamp(r, max=epsilon_high).detach() * a * lp_row[t]
                high[b][t] = bool(r > epsilon_high) and bool(a > 0)
            elif loss_type == "sapo":
                tau = sapo_temperature_pos if bool(a > 0) else sapo_temperature_neg
                l = -a * torch.sigmoid(tau * (r - 1)) * 4 / tau
            elif loss_type == "vespo":
                phi = _vespo_phi_row([log_r[u].detach() for u in range(T)], [bool(valid[b, u]) for u in range(T)],
                                     None if isr is None else ([isr[b, 0]] if isr_per_row else [isr[b, u] for u in range(T)]),
                                     float(a),
                                     vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
                l = -phi * a * lp_row[t]
            elif loss_type == "kl_cov":
                l = -a * r
                if (b, t) in selected:
                    l = l + ppo_kl_coef * torch.abs(lp_row[t] - old_row[t])
            else:
                raise ValueError(loss_type)
            if top_entropy_quantile < 1.0 and not keep[b][t]:
                l = l * 0.0
            if isr is not None and loss_type != "vespo":
                l = l * isr[b, t]
            if beta != 0.0:
                d = val(ref, b, t) - lp_row[t]
                k3 = torch.exp(d) - d - 1
                if use_bias_correction_kl:
                    k3 = k3 * r
                kl_tok[b][t] = k3
                l = l + beta * k3
            ell[b][t] = l

    # ---- aggregation (section 4) ----------------------------------------------------------
    n_row = [sum(1 for t in range(T) if valid[b, t]) for b in range(B)]
    n_all = sum(n_row)

    def masked_sum(b):
        return sum((ell[b][t] for t in range(T) if valid[b, t]), zero)

    if loss_type in ("grpo", "sapo"):
        loss = sum((masked_sum(b) / max(n_row[b], 1) for b in range(B)), zero) / max(B, 1)
    elif loss_type == "bnpo":
        loss = sum((masked_sum(b) for b in range(B)), zero) / max(n_all, 1)
    elif loss_type == "dr_grpo":
        loss = sum((masked_sum(b) for b in range(B)), zero) / (B * max_completion_length)
    elif loss_type in ("dapo", "cispo", "vespo", "clip_cov", "kl_cov"):
        n_items = float(num_items_in_batch) if num_items_in_batch is not None else float(n_all)
        loss = sum((masked_sum(b) for b in range(B)), zero) / max(n_items, 1.0)
    elif luspo_liger:
        loss = sum((ell[b][t] * n_row[b] for b in range(B) for t in range(T)), zero) / max(B * T, 1)
    else:
        loss = sum((masked_sum(b) for b in range(B)), zero) / max(B, 1)
    policy_loss = loss

    # ---- entropy bonus (section 5) --------------------------------------------------------
    if entropy_coef != 0.0:
        cells = [(b, t) for b in range(B) for t in range(T) if keep[b][t]]
        h_sum = sum((H_bonus[b, t] for b, t in cells), zero)
        token_normalized = loss_type in ("dapo", "cispo", "vespo", "clip_cov", "kl_cov")
        if bonus_normalization == "auto" and token_normalized and num_items_in_batch is not None:
            # window-exact: the policy term's denominator N_items (issue 13 item 2)
            loss = loss - entropy_coef * h_sum / max(float(num_items_in_batch), 1.0)
        else:
            loss = loss - entropy_coef * h_sum / max(len(cells), 1)

    # ---- metrics --------------------------------------------------------------------------
    def mean_m(f):
        return torch.tensor(sum(float(torch.as_tensor(f(b, t)).detach()) for b in range(B) for t in range(T) if valid[b, t]) / max(n_all, 1),
                            dtype=dt)

    metrics: Dict[str, torch.Tensor] = {"policy_loss": policy_loss.detach()}
    if beta != 0.0:
        metrics["kl"] = mean_m(lambda b, t: kl_tok[b][t])
    metrics["clip_ratio/low_mean"] = mean_m(lambda b, t: low[b][t])
    metrics["clip_ratio/high_mean"] = mean_m(lambda b, t: high[b][t])
    metrics["clip_ratio/region_mean"] = mean_m(lambda b, t: low[b][t] or high[b][t])
    if loss_type in ("clip_cov", "kl_cov"):
        metrics["cov/selected_mean"] = torch.tensor(len(selected) / max(n_all, 1), dtype=dt)
    if entropy is not None:
        metrics["entropy"] = mean_m(lambda b, t: entropy[b, t])
    if clamped_entropy is not None:
        metrics["clamped_entropy"] = mean_m(lambda b, t: clamped_entropy[b, t])
    metrics["entropy_coef"] = torch.tensor(float(entropy_coef), dtype=dt)
    return loss, metrics
