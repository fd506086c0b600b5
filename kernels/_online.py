"""Shared @triton.jit helpers: the logit transform, the online log-sum-exp state and dL/dz.

Online state of one row over vocabulary tiles (MATH.md section 2)::

    m = max z            (-inf while the row has seen only -inf logits; never initialised to 0)
    s = sum e^(z - m)
    t = sum (z - m) e^(z - m)       shifted, so that entropy = log s - t/s never subtracts two
                                    large numbers (t = sum z e^(z-m) would, at |z| ~ 1e4)

    lse = m + log s,   H = log s - t/s

The finished state is kept as ``(m, log s)``, never as ``lse``: rounded to fp32, ``m + log s`` loses
``log s`` when ``|m|`` is large (at ``m = 1e8`` the fp32 spacing is 8, so ``lse == m`` and
``z - lse`` is off by ``log s``). Every consumer forms ``logp = (z - m) - log s`` and
``p = e^((z - m) - log s)``: ``z - m`` is exact near the max (Sterbenz) and ``log s`` is at most
``log V``, so the error is that of plain torch's ``log_softmax`` at the same precision.

Every kernel of the package updates this state through ``tile_state`` + ``merge_state`` (the merge
is written once, here), and every backward kernel forms dL/dz of a tile through ``tile_grad``
(row statistics and upstream gradients loaded, ``grad_z``, then the transform's chain rule).
"""
import triton
import triton.language as tl


@triton.jit
def tanh(u):
    """tanh without libdevice (the interpreter has none), accurate to a few ulp in fp32 and fp64.

    tanh|u| = (1 - e) / (1 + e) with e = e^(-2|u|), exact as an identity; where 1 - e would cancel
    (small |u|) the Taylor series u - u^3/3 + 2u^5/15 - ... is used instead: through u^11 below 0.4
    in fp32 (truncation < 1e-7 relative), through u^15 below 0.1 in fp64 (< 1e-16).
    """
    a = tl.abs(u)
    a2 = a * a
    if u.dtype == tl.float64:
        small = a < 0.1
        c = -929569.0 / 638512875.0
        c = 21844.0 / 6081075.0 + a2 * c
        c = -1382.0 / 155925.0 + a2 * c
    else:
        small = a < 0.4
        c = -1382.0 / 155925.0
    c = 62.0 / 2835.0 + a2 * c
    c = -17.0 / 315.0 + a2 * c
    c = 2.0 / 15.0 + a2 * c
    c = -1.0 / 3.0 + a2 * c
    poly = a + a * a2 * c
    e = tl.exp(-2.0 * a)
    r = tl.where(small, poly, (1.0 - e) / (1.0 + e))
    return tl.where(u < 0.0, -r, r)


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, bitwise torch's division.

    A plain fp32 ``/`` compiles to the approximate ``div.full.f32`` on NVIDIA GPUs (within 2 ulp,
    not correctly rounded), while torch and the interpreter divide exactly; a value compared with
    torch's bit for bit (the top-k ``tie_frac``) must use this. fp64 ``/`` is already ``div.rn.f64``
    (and ``tl.math.div_rn`` takes fp32 only).
    """
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def scalar_arg(scal_ptr, i: tl.constexpr, v):
    """The transform's runtime scalar ``v`` at the precision of the inputs.

    Triton types a Python-float kernel argument fp32, so on a GPU ``temperature``, ``softcap``,
    ``logit_scale`` and ``inv_temperature`` arrive rounded to fp32 (the interpreter passes the Python
    float itself and hides it). fp64 launches therefore also pass ``scal_ptr``, a 4-element fp64
    tensor [logit_scale, softcap, temperature, inv_temperature] (``_launch._fp64_scalars``), and the
    kernel reads element ``i`` instead of ``v``. Every other launch passes None, a constexpr: their
    builds are the fp32-argument ones as before. A new value never recompiles either way.
    """
    if scal_ptr is not None:
        v = tl.load(scal_ptr + i)
    return v


@triton.jit
def transform(a, logit_scale, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """z = softcap(logit_scale * a) / T, softcap(x) = c tanh(x / c) (MATH.md section 1)."""
    a = a * logit_scale
    if HAS_SOFTCAP:
        a = softcap * tanh(a / softcap)
    return a * inv_temperature


@triton.jit
def transform_grad(dz, z, logit_scale, softcap, temperature, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """dL/da from dL/dz, written with the transformed z: dz/da = scale (1 - (zT/c)^2) / T."""
    if HAS_SOFTCAP:
        r = z * (temperature / softcap)
        dz = dz * (1.0 - r * r)
    return dz * (logit_scale * inv_temperature)


@triton.jit
def tile_state(z):
    """(m, s, t) of a [BLOCK_N, BLOCK_V] tile, shifted by the tile's own row max.

    A row of -inf gives (-inf, 0, 0): the shift uses 0 instead of -inf so no -inf - -inf appears,
    and (z - m) e^(z - m) is taken as 0 where e^(z - m) = 0 (no 0 * -inf).
    """
    m = tl.max(z, axis=1)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    d = z - m0[:, None]
    e = tl.exp(d)
    s = tl.sum(e, axis=1)
    t = tl.sum(tl.where(e > 0.0, d * e, 0.0), axis=1)
    return m, s, t


@triton.jit
def merge_state(m_a, s_a, t_a, m_b, s_b, t_b):
    """Merge two online states of the same rows (an empty state has m = -inf, s = t = 0).

    With m = max(m_a, m_b) and c_a = e^(m_a - m):  s = c_a s_a + c_b s_b and
    t = c_a (t_a + (m_a - m) s_a) + c_b (t_b + (m_b - m) s_b), since t is shifted by m.
    """
    m = tl.maximum(m_a, m_b)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    d_a = m_a - m0
    d_b = m_b - m0
    c_a = tl.exp(d_a)
    c_b = tl.exp(d_b)
    s = c_a * s_a + c_b * s_b
    # an empty side has d = -inf and s = 0: skip it instead of forming -inf * 0
    t = tl.where(s_a > 0.0, c_a * (t_a + d_a * s_a), 0.0) + tl.where(s_b > 0.0, c_b * (t_b + d_b * s_b), 0.0)
    return m, s, t


@triton.jit
def finish_state(m, s, t):
    """(log s, entropy) of a finished state; a row of only -inf logits (m = -inf, s = 0) gives (0, 0),
    so that ``m + log s`` is -inf there and nothing downstream forms -inf - -inf.

    A NaN or +inf logit makes s NaN (e^(z - m) is NaN there), and the guards test ``s == 0``, not
    ``s > 0`` (false for NaN), so the row's log s and entropy are NaN as in ``torch.log_softmax``.
    """
    log_s = tl.where(s == 0.0, 0.0, tl.log(s))
    ent = tl.where(s == 0.0, 0.0, log_s - t / s)
    return log_s, ent


@triton.jit
def grad_z(
    z, offs_v, y,
    m, log_s, ent, g_lp, g_ent,
    tau, frac, log_s_c, ent_c, g_cl,
    HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_CL: tl.constexpr,
):
    """dL/dz of one tile, L = sum_rows g_lp logp + g_ent H + g_cl H~ (MATH.md sections 2-3).

        dlogp/dz_v = 1[v = y] - p_v
        dH/dz_v    = -p_v (log p_v + H)
        dH~/dz_v   = -w_v pi_v (log pi_v + H~),   w_v = 1 above tau, frac at tau, 0 below

    with ``log p_v = (z_v - m) - log s`` and ``log pi_v = (z_v - m) - log s_S`` (never ``z - lse``:
    see the module docstring). ``z``: [BLOCK_N, BLOCK_V] transformed logits (-inf at padded
    columns); per-row vectors [BLOCK_N]. Rows that get no gradient (ignored ones) are zeroed by the
    caller after the transform's chain rule (``tile_grad``). Only the flagged terms are computed, so
    a gradient on one output costs nothing for the others.
    """
    dz = tl.zeros(z.shape, dtype=z.dtype)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    # the clamped term first: its tau/frac/log s_S/H~ row vectors die before log p and p are
    # formed; the other order kept one more tile live (a backward kernel that has since been
    # removed spilled on sm_90, AOT gate, once log s came in as a row vector of its own)
    if HAS_G_CL:
        w = tl.where(z > tau[:, None], 1.0, tl.where(z == tau[:, None], frac[:, None], 0.0))
        log_pi = (z - m0[:, None]) - log_s_c[:, None]
        pi = tl.exp(log_pi) * w
        dz -= tl.where(pi == 0.0, 0.0, pi * (log_pi + ent_c[:, None])) * g_cl[:, None]
    if HAS_G_LP or HAS_G_ENT:
        logp_all = (z - m0[:, None]) - log_s[:, None]
        p = tl.exp(logp_all)
        if HAS_G_ENT:
            # p = 0 where z = -inf: take the product as 0 rather than 0 * -inf (a NaN p stays NaN)
            dz -= tl.where(p == 0.0, 0.0, p * (logp_all + ent[:, None])) * g_ent[:, None]
        if HAS_G_LP:
            dz -= p * g_lp[:, None]
            dz += tl.where(offs_v[None, :] == y[:, None], g_lp[:, None], 0.0)
    return dz


@triton.heuristics({"ENTROPY": lambda a: a["ent_ptr"] is not None})
@triton.jit
def finish_stats_kernel(
    part_ptr, y_ptr, m_ptr, log_s_ptr, logp_ptr, ent_ptr, N, n_split, ignore_index,
    ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """part [4, n_split, N] = (m, s, t, z_y) per vocabulary split -> m, log s, logprobs, entropy [N].

    logp = (z_y - m) - log s and H = log s - t/s on valid rows, 0 on ignored rows (as in
    torch_chunked); a row of only -inf logits keeps m = -inf and gets log s = 0, so nothing is NaN.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # tl.cast, not .to(): the JIT turns an integer argument equal to 1 into a Python int constant
    plane = tl.cast(n_split, tl.int64) * N
    m = tl.load(part_ptr + offs, mask=mask, other=float("-inf"))
    s = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
    t = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)
    z_y = tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0)
    p = part_ptr + offs
    for _ in range(1, n_split):
        p += N
        m, s, t = merge_state(
            m, s, t,
            tl.load(p, mask=mask, other=float("-inf")),
            tl.load(p + plane, mask=mask, other=0.0),
            tl.load(p + 2 * plane, mask=mask, other=0.0),
        )
        z_y += tl.load(p + 3 * plane, mask=mask, other=0.0)
    log_s, ent = finish_state(m, s, t)
    y = tl.load(y_ptr + offs, mask=mask, other=ignore_index)
    valid = y != ignore_index
    m0 = tl.where(m == float("-inf"), 0.0, m)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(log_s_ptr + offs, log_s, mask=mask)
    tl.store(logp_ptr + offs, tl.where(valid, (z_y - m0) - log_s, 0.0), mask=mask)
    if ENTROPY:
        tl.store(ent_ptr + offs, tl.where(valid, ent, 0.0), mask=mask)


# constexpr flags of every kernel that takes row statistics and upstream gradients (tile_grad)
GRAD_HEURISTICS = {
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
    "HAS_G_LP": lambda a: a["g_lp_ptr"] is not None,
    "HAS_G_ENT": lambda a: a["g_ent_ptr"] is not None,
    "HAS_G_CL": lambda a: a["g_cl_ptr"] is not None,
}


@triton.jit
def tile_grad(
    z, offs_n, offs_v, mask_n, mask_v, y_ptr,
    m_ptr, log_s_ptr, ent_ptr, tau_ptr, frac_ptr, log_s_c_ptr, ent_c_ptr,
    g_lp_ptr, g_ent_ptr, g_cl_ptr, ignore_index,
    logit_scale, softcap, temperature, inv_temperature,
    HAS_SOFTCAP: tl.constexpr, HAS_G_LP: tl.constexpr, HAS_G_ENT: tl.constexpr, HAS_G_CL: tl.constexpr,
):
    """dL/da of one [BLOCK_N, BLOCK_V] tile of logits ``z`` (a: before the transform):
    loads the rows' statistics and upstream gradients, ``grad_z`` then ``transform_grad``.
    0 on ignored rows, rows past N and padded columns; ``offs_v`` are global vocabulary columns."""
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0)
    log_s = tl.load(log_s_ptr + offs_n, mask=mask_n, other=0.0)
    # a row of only -inf logits has no gradient; one whose log s is NaN (a NaN or +inf logit) keeps
    # it, NaN, even if its max (which skips NaN) is -inf
    row_ok = mask_n & (y != ignore_index) & ((m != float("-inf")) | (log_s != log_s))
    # placeholders for the terms that are switched off (never read then)
    ent, g_lp, g_ent, tau, frac, log_s_c, ent_c, g_cl = m, m, m, m, m, m, m, m
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_G_ENT:
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        g_ent = tl.load(g_ent_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_G_CL:
        tau = tl.load(tau_ptr + offs_n, mask=mask_n, other=0.0)
        frac = tl.load(frac_ptr + offs_n, mask=mask_n, other=0.0)
        log_s_c = tl.load(log_s_c_ptr + offs_n, mask=mask_n, other=0.0)
        ent_c = tl.load(ent_c_ptr + offs_n, mask=mask_n, other=0.0)
        g_cl = tl.load(g_cl_ptr + offs_n, mask=mask_n, other=0.0)
    dz = grad_z(z, offs_v, y, m, log_s, ent, g_lp, g_ent, tau, frac, log_s_c, ent_c, g_cl,
                HAS_G_LP, HAS_G_ENT, HAS_G_CL)
    dz = transform_grad(dz, z, logit_scale, softcap, temperature, inv_temperature, HAS_SOFTCAP)
    # after the chain rule: padded columns hold z = -inf, where the softcap factor is -inf, and an
    # ignored row with a NaN logit has a NaN factor (0 * NaN): both are dropped here explicitly
    return tl.where(row_ok[:, None] & mask_v[None, :], dz, 0.0)
