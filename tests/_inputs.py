"""Seeded input builders shared by the test files.

Each builder draws from its own ``torch.Generator`` in a fixed order, so a (shape, seed) gives the
same tensors in every file; files apply their own ignored rows, ties or fills on top. Everything is
drawn in fp64 on the CPU.
"""
import math

import torch

F64 = torch.float64


def linear_inputs(n, h, v, *, seed=0, bias=True, scale=1.0, dtype=F64, lead=None):
    """``(hidden [n, h], weight [v, h], bias [v] or None, targets [n])`` for the linear head.

    hidden ~ N(0, scale^2), weight ~ N(0, 1/h), bias ~ N(0, 1), targets uniform in [0, v); the
    floating tensors are cast to ``dtype`` after drawing. With ``lead``, hidden and targets are
    reshaped to ``lead + (h,)`` and ``lead``.
    """
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g, dtype=F64) * scale).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=F64) / math.sqrt(h)).to(dtype)
    b = torch.randn(v, generator=g, dtype=F64).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    if lead is not None:
        x, y = x.reshape(*lead, h), y.reshape(lead)
    return x, w, b, y


def tie_columns(w, b, *spans):
    """Copy (weight row, bias) of each span's first column onto the rest of the span, in place:
    exactly tied logits in every row. ``spans`` are ``(first, stop)`` column ranges."""
    for first, stop in spans:
        w[first + 1:stop] = w[first]
        if b is not None:
            b[first + 1:stop] = b[first]


def logits_inputs(n, v, *, seed=0, scale=3.0):
    """``(logits [n, v] ~ N(0, scale^2), targets [n] uniform in [0, v))``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=F64) * scale
    y = torch.randint(0, v, (n,), generator=g)
    return logits, y


def grpo_inputs(b=3, t=5, *, seed=0, adv_shape="B", masked=-math.inf, clamped=True, dtype=F64):
    """A GRPO batch ``(logprobs, old, ref, advantages, mask, is_ratio, entropy[, clamped_entropy])``.

    Advantages are per sequence ``[b]`` (``adv_shape="B"``) or per token ``[b, t]``; row 1's are 0
    exactly (a group with equal rewards). Masked log-probs hold ``masked`` (garbage that must not
    matter); the first token is always kept, the last row's last two never. The floating tensors
    are cast to ``dtype`` last.
    """
    g = torch.Generator().manual_seed(seed)
    d = F64
    lp = -torch.rand(b, t, generator=g, dtype=d) * 3
    old = lp + 0.4 * torch.randn(b, t, generator=g, dtype=d)
    ref = lp + 0.4 * torch.randn(b, t, generator=g, dtype=d)
    adv = 2 * torch.randn(b, generator=g, dtype=d) if adv_shape == "B" else 2 * torch.randn(b, t, generator=g, dtype=d)
    if b > 1:
        adv[1] = 0.0
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[-1, -2:] = False
    mask[0, 0] = True
    isr = torch.rand(b, t, generator=g, dtype=d) + 0.5
    ent = torch.rand(b, t, generator=g, dtype=d) * 3
    out = [lp, old, ref, adv, mask, isr, ent]
    if clamped:
        out.append(ent * torch.rand(b, t, generator=g, dtype=d))
    out[0] = torch.where(mask, lp, torch.full_like(lp, masked))
    return [x.to(dtype) if x.is_floating_point() else x for x in out]


def leaves(*ts):
    """Fresh leaf copies that require grad (``None`` stays ``None``)."""
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def grads_of(outs, weights, inputs):
    """Gradients of ``sum(out * weight)`` w.r.t. the non-None ``inputs`` (zeros where unused)."""
    loss = sum((o * wt).sum() for o, wt in zip(outs, weights) if o is not None and wt is not None)
    want = [t for t in inputs if t is not None]
    gs = torch.autograd.grad(loss, want, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, want)]
