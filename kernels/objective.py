"""GRPO-family per-token objective and its derivative (MATH.md section 4), one program per row.

For row ``b`` and every token ``t`` the kernel forms

    l_tot[t] = e[t] * is[t] * l[t] + beta * kl[t]          (is skipped for vespo)
    c[t]     = row_scale[b] * (M[t] if MASK_WEIGHTED else 1)

and writes ``sum_t c * l_tot`` (the row's share of the loss), the masked sums of ``kl`` and of the
low/high clip flags (metrics), and, when ``COMPUTE_GRAD``, ``d loss / d logp[t]``.

Token level (``w = logp - old``) needs one pass over the row. Sequence level (GSPO, ``w`` = masked
mean of ``logp - old`` over the row) and VESPO (a weight from the summed log-ratio) need a statistic
of the whole row first: a pre-pass computes it, the main pass accumulates
``G = sum_t c * d l_tot / d w``, and a last pass writes ``c * (direct part) + M[t] / max(n, 1) * G``.
A row is one program, so no statistic ever crosses programs: the grid is 1-D over rows with int64 row
offsets (a (rows, tokens) grid would be limited to 65535 in its second dimension).

Inputs are validated and sanitized by the launcher: masked positions hold finite values, every
floating tensor has the compute dtype (fp32, or fp64). Scalars (epsilons, delta, beta, SAPO
temperatures, VESPO shape/rate) come through ``PARAMS`` (a tensor in the compute dtype), so a new value
never recompiles and fp64 runs keep fp64 constants.
"""
import triton
import triton.language as tl

# LOSS codes
CLIPPED: tl.constexpr = tl.constexpr(0)  # grpo, bnpo, dr_grpo, dapo, luspo
CISPO: tl.constexpr = tl.constexpr(1)
SAPO: tl.constexpr = tl.constexpr(2)
VESPO: tl.constexpr = tl.constexpr(3)

# PARAMS layout
P_EPS_LOW: tl.constexpr = tl.constexpr(0)
P_EPS_HIGH: tl.constexpr = tl.constexpr(1)
P_DELTA: tl.constexpr = tl.constexpr(2)
P_BETA: tl.constexpr = tl.constexpr(3)
P_TAU_POS: tl.constexpr = tl.constexpr(4)
P_TAU_NEG: tl.constexpr = tl.constexpr(5)
P_K_POS: tl.constexpr = tl.constexpr(6)
P_LAM_POS: tl.constexpr = tl.constexpr(7)
P_K_NEG: tl.constexpr = tl.constexpr(8)
P_LAM_NEG: tl.constexpr = tl.constexpr(9)  # the launcher applies Liger/TRL's lower bound 1e-4 to both rates
P_VESPO_LOG_LOW: tl.constexpr = tl.constexpr(10)  # log(1e-8): in PARAMS so that fp64 runs use the fp64 value
N_PARAMS: tl.constexpr = tl.constexpr(11)

VESPO_LOG_HIGH: tl.constexpr = tl.constexpr(20.0)


@triton.jit
def clamp_nan(x, lo, hi):
    """min(max(x, lo), hi) keeping NaN, as ``torch.clamp`` does: ``tl.minimum``/``tl.maximum``
    return the other operand of a NaN, and their NaN-propagating form has no fp64 instruction."""
    return tl.where(x != x, x, tl.minimum(tl.maximum(x, lo), hi))


@triton.jit
def _row_prepass(
    lp_row, old_row, mask_row, isr_row, stride_isr_t, params_ptr, T,
    HAS_OLD: tl.constexpr, HAS_ISR: tl.constexpr, LOSS: tl.constexpr, SEQUENCE: tl.constexpr,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Row statistics: (masked mean of log r, log w_seq of VESPO, token count)."""
    vespo_low = tl.load(params_ptr + P_VESPO_LOG_LOW)
    offs_t = tl.arange(0, BLOCK_T)
    acc_lr = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_vespo = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_n = tl.zeros([BLOCK_T], dtype=DTYPE)
    for start in range(0, T, BLOCK_T):
        t = start + offs_t
        in_row = t < T
        m = (tl.load(mask_row + t, mask=in_row, other=0) != 0).to(DTYPE)
        lr = tl.zeros([BLOCK_T], dtype=DTYPE)
        if HAS_OLD:
            lr = tl.load(lp_row + t, mask=in_row, other=0.0) - tl.load(old_row + t, mask=in_row, other=0.0)
        acc_lr += lr * m
        acc_n += m
        if LOSS == VESPO:
            # clamps that keep NaN, as torch.clamp does (a NaN row weight becomes 0 below, as in torch)
            acc_vespo += clamp_nan(lr, -20.0, 20.0) * m
            if HAS_ISR:
                # Liger/TRL add log(is) of every position of the row, masked or not; a per-row
                # ratio (stride 0 along t) counts once.
                isr = tl.load(isr_row + t * stride_isr_t, mask=in_row, other=1.0)
                log_isr = clamp_nan(tl.log(isr), vespo_low, VESPO_LOG_HIGH)
                acc_vespo += tl.where(in_row & ((t == 0) | (stride_isr_t != 0)), log_isr, 0.0)
    n = tl.sum(acc_n, axis=0)
    w_seq = tl.sum(acc_lr, axis=0) / tl.maximum(n, 1.0)
    log_w_vespo = clamp_nan(tl.sum(acc_vespo, axis=0), vespo_low, VESPO_LOG_HIGH)
    return w_seq, log_w_vespo, n


@triton.jit
def _token_terms(
    lp, old, ref, a, e, isr, w_seq, log_w_vespo, params_ptr,
    HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISR: tl.constexpr, HAS_EMASK: tl.constexpr, LOSS: tl.constexpr, SEQUENCE: tl.constexpr,
):
    """Per-token ``l_tot``, ``d l_tot / d w`` (through the ratio), ``d l_tot / d logp`` (direct),
    ``kl`` (bias-corrected when asked) and the low/high clip flags."""
    if SEQUENCE:
        logw = w_seq + 0.0 * lp
    elif HAS_OLD:
        logw = lp - old
    else:
        logw = 0.0 * lp
    r = tl.exp(logw)
    zero = tl.zeros_like(lp)  # not 0 * lp, which is NaN where lp is
    d_w = zero
    d_lp = zero
    low = zero != zero  # all False, the shape of lp
    high = low
    if LOSS == CLIPPED:
        eps_low = tl.load(params_ptr + P_EPS_LOW)
        eps_high = tl.load(params_ptr + P_EPS_HIGH)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        r2 = tl.minimum(tl.maximum(r, lo), hi)
        dr2 = tl.where((r >= lo) & (r <= hi), r, 0.0)
        if HAS_DELTA:
            delta = tl.load(params_ptr + P_DELTA)
            r1 = tl.minimum(r, delta)
            dr1 = tl.where(r <= delta, r, 0.0)
        else:
            r1 = r
            dr1 = r
        x1 = r1 * a
        x2 = r2 * a
        ell = -tl.minimum(x1, x2)
        # torch.minimum sends the gradient to the smaller operand, half to each on a tie
        w1 = tl.where(x1 < x2, 1.0, tl.where(x1 == x2, 0.5, 0.0))
        d_w = -a * (w1 * dr1 + (1.0 - w1) * dr2)
        # a NaN ratio (a NaN log-prob): NaN loss and gradient as in torch, never the clip bound
        # that tl.minimum/tl.maximum (which return the other operand of a NaN) would give
        nan_r = r != r
        ell = tl.where(nan_r, r, ell)
        d_w = tl.where(nan_r, r, d_w)
        low = (r < lo) & (a < 0.0)
        high = (r > hi) & (a > 0.0)
    elif LOSS == CISPO:
        eps_high = tl.load(params_ptr + P_EPS_HIGH)
        coef = tl.where(r != r, r, tl.minimum(r, eps_high))  # a NaN ratio stays NaN
        ell = -coef * a * lp
        d_lp = -coef * a
        high = (r > eps_high) & (a > 0.0)
    elif LOSS == SAPO:
        tau = tl.where(a > 0.0, tl.load(params_ptr + P_TAU_POS), tl.load(params_ptr + P_TAU_NEG))
        s = tl.sigmoid(tau * (r - 1.0))
        ell = -a * s * 4.0 / tau
        d_w = -4.0 * a * s * (1.0 - s) * r
    else:  # VESPO: phi is a constant weight per (row, sign of A)
        nonneg = a >= 0.0
        k = tl.where(nonneg, tl.load(params_ptr + P_K_POS), tl.load(params_ptr + P_K_NEG))
        lam = tl.where(nonneg, tl.load(params_ptr + P_LAM_POS), tl.load(params_ptr + P_LAM_NEG))
        w_v = tl.exp(log_w_vespo)
        phi = tl.exp(lam + k * log_w_vespo - lam * w_v)
        phi = tl.where(phi == phi, phi, 0.0)  # NaN -> 0
        phi = tl.where(tl.abs(phi) < float("inf"), phi, 0.0)  # +-inf -> 0
        ell = -phi * a * lp
        d_lp = -phi * a
    if HAS_EMASK:
        ell = ell * e
        d_w = d_w * e
        d_lp = d_lp * e
    if HAS_ISR and LOSS != VESPO:
        ell = ell * isr
        d_w = d_w * isr
        d_lp = d_lp * isr
    kl = zero
    if HAS_KL:
        beta = tl.load(params_ptr + P_BETA)
        d = ref - lp
        ed = tl.exp(d)
        kl = ed - d - 1.0
        dkl = 1.0 - ed
        if BIAS_CORR:
            d_lp += beta * dkl * r
            d_w += beta * kl * r
            kl = kl * r
        else:
            d_lp += beta * dkl
        ell += beta * kl
    return ell, d_w, d_lp, kl, low, high


@triton.jit
def _tile_terms(
    t, in_row, lp_row, old_row, ref_row, adv_row, mask_row, emask_row, isr_row, stride_adv_t, stride_isr_t,
    scale, w_seq, log_w_vespo, params_ptr,
    HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr, BIAS_CORR: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_ISR: tl.constexpr, HAS_EMASK: tl.constexpr, LOSS: tl.constexpr, SEQUENCE: tl.constexpr,
    MASK_WEIGHTED: tl.constexpr, DTYPE: tl.constexpr,
):
    """Load one tile of a row's tokens and return (mask, aggregation weight c, _token_terms(...)).

    Shared by the loss pass and the sequence-level gradient pass, which read the same tokens.
    """
    m = (tl.load(mask_row + t, mask=in_row, other=0) != 0).to(DTYPE)
    lp = tl.load(lp_row + t, mask=in_row, other=0.0)
    old = lp
    if HAS_OLD:
        old = tl.load(old_row + t, mask=in_row, other=0.0)
    ref = lp
    if HAS_KL:
        ref = tl.load(ref_row + t, mask=in_row, other=0.0)
    a = tl.load(adv_row + t * stride_adv_t, mask=in_row, other=0.0)
    e = m
    if HAS_EMASK:
        e = (tl.load(emask_row + t, mask=in_row, other=0) != 0).to(DTYPE)
    isr = m
    if HAS_ISR:
        isr = tl.load(isr_row + t * stride_isr_t, mask=in_row, other=0.0)
    ell, d_w, d_lp, kl, low, high = _token_terms(
        lp, old, ref, a, e, isr, w_seq, log_w_vespo, params_ptr,
        HAS_OLD, HAS_KL, BIAS_CORR, HAS_DELTA, HAS_ISR, HAS_EMASK, LOSS, SEQUENCE,
    )
    if MASK_WEIGHTED:
        c = scale * m
    else:
        c = tl.where(in_row, scale + tl.zeros_like(lp), 0.0)
    return m, c, ell, d_w, d_lp, kl, low, high


@triton.jit
def grpo_objective_kernel(
    LP, OLD, REF, ADV, MASK, EMASK, ISR, ROW_SCALE, PARAMS,
    GRAD, ROW_LOSS, ROW_KL, ROW_LOW, ROW_HIGH,
    T,
    stride_lp, stride_old, stride_ref, stride_adv_b, stride_adv_t, stride_mask, stride_emask,
    stride_isr_b, stride_isr_t, stride_grad,
    LOSS: tl.constexpr, SEQUENCE: tl.constexpr, HAS_OLD: tl.constexpr, HAS_KL: tl.constexpr,
    BIAS_CORR: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_ISR: tl.constexpr, HAS_EMASK: tl.constexpr,
    MASK_WEIGHTED: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    lp_row = LP + row * stride_lp
    old_row = OLD + row * stride_old
    ref_row = REF + row * stride_ref
    adv_row = ADV + row * stride_adv_b
    mask_row = MASK + row * stride_mask
    emask_row = EMASK + row * stride_emask
    isr_row = ISR + row * stride_isr_b
    grad_row = GRAD + row * stride_grad
    scale = tl.load(ROW_SCALE + row)

    w_seq = tl.zeros([], dtype=DTYPE)
    log_w_vespo = tl.zeros([], dtype=DTYPE)
    n_row = tl.zeros([], dtype=DTYPE)
    if SEQUENCE or LOSS == VESPO:
        w_seq, log_w_vespo, n_row = _row_prepass(
            lp_row, old_row, mask_row, isr_row, stride_isr_t, PARAMS, T,
            HAS_OLD, HAS_ISR, LOSS, SEQUENCE, DTYPE, BLOCK_T,
        )

    acc_loss = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_kl = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_low = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_high = tl.zeros([BLOCK_T], dtype=DTYPE)
    acc_g = tl.zeros([BLOCK_T], dtype=DTYPE)
    for start in range(0, T, BLOCK_T):
        t = start + offs_t
        in_row = t < T
        m, c, ell, d_w, d_lp, kl, low, high = _tile_terms(
            t, in_row, lp_row, old_row, ref_row, adv_row, mask_row, emask_row, isr_row, stride_adv_t, stride_isr_t,
            scale, w_seq, log_w_vespo, PARAMS,
            HAS_OLD, HAS_KL, BIAS_CORR, HAS_DELTA, HAS_ISR, HAS_EMASK, LOSS, SEQUENCE, MASK_WEIGHTED, DTYPE,
        )
        acc_loss += c * ell
        acc_kl += m * kl
        acc_low += m * low.to(DTYPE)
        acc_high += m * high.to(DTYPE)
        if COMPUTE_GRAD:
            if SEQUENCE:
                acc_g += c * d_w
            else:
                tl.store(grad_row + t, c * (d_w + d_lp), mask=in_row)
    tl.store(ROW_LOSS + row, tl.sum(acc_loss, axis=0))
    tl.store(ROW_KL + row, tl.sum(acc_kl, axis=0))
    tl.store(ROW_LOW + row, tl.sum(acc_low, axis=0))
    tl.store(ROW_HIGH + row, tl.sum(acc_high, axis=0))

    if COMPUTE_GRAD and SEQUENCE:
        # d w_seq / d logp[t] = M[t] / max(n, 1): the row's summed ratio gradient goes back to every
        # valid token equally, plus each token's direct part.
        g_seq = tl.sum(acc_g, axis=0) / tl.maximum(n_row, 1.0)
        for start in range(0, T, BLOCK_T):
            t = start + offs_t
            in_row = t < T
            m, c, ell, d_w, d_lp, kl, low, high = _tile_terms(
                t, in_row, lp_row, old_row, ref_row, adv_row, mask_row, emask_row, isr_row, stride_adv_t, stride_isr_t,
                scale, w_seq, log_w_vespo, PARAMS,
                HAS_OLD, HAS_KL, BIAS_CORR, HAS_DELTA, HAS_ISR, HAS_EMASK, LOSS, SEQUENCE, MASK_WEIGHTED, DTYPE,
            )
            tl.store(grad_row + t, c * d_lp + m * g_seq, mask=in_row)
