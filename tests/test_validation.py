"""Bad input gets a clear Python error naming the argument, before any kernel runs."""
import math

import pytest
import torch

import fused_entropy as fe


def inputs(n=4, h=8, v=16):
    return torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda x, w, y: (x, torch.randn(16, 7), y), ValueError, r"H=8.*H=7"),
        (lambda x, w, y: (x, torch.randn(16), y), ValueError, r"weight must have shape \[V, H\]"),
        (lambda x, w, y: (x, w, y[:3]), ValueError, r"targets must have shape \(4,\)"),
        (lambda x, w, y: (x, w, y.float()), TypeError, r"targets must be an integer tensor"),
        (lambda x, w, y: (x.long(), w, y), TypeError, r"hidden must be a floating tensor"),
        (lambda x, w, y: (x, w.double(), y), TypeError, r"weight dtype torch.float64 does not match hidden dtype torch.float32"),
        (lambda x, w, y: (x, w, torch.tensor([0, 1, 16, 2])), ValueError, r"targets must be in \[0, 16\).*found 16"),
        (lambda x, w, y: (x, w, torch.tensor([0, -1, 3, 2])), ValueError, r"found -1"),
        (lambda x, w, y: (x, w[:0], y), ValueError, r"V >= 1"),
    ],
    ids=["h-mismatch", "weight-1d", "targets-shape", "targets-float", "hidden-int", "dtype-mismatch", "target-too-big", "target-negative", "v0"],
)
def test_linear_bad_tensors(mutate, exc, match):
    x, w, y = mutate(*inputs())
    with pytest.raises(exc, match=match):
        fe.linear_logprobs(x, w, y, backend="torch")


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(temperature=0.0), ValueError, r"temperature must be finite and > 0, got 0.0"),
        (dict(temperature=-1.0), ValueError, r"temperature"),
        (dict(temperature=math.inf), ValueError, r"temperature"),
        (dict(temperature=math.nan), ValueError, r"temperature"),
        (dict(softcap=0.0), ValueError, r"softcap must be finite and > 0"),
        (dict(softcap=-3.0), ValueError, r"softcap"),
        (dict(logit_scale=math.inf), ValueError, r"logit_scale must be finite"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
        (dict(topk=0), ValueError, r"topk must be in \[1, V=16\], got 0"),
        (dict(topk=17), ValueError, r"topk must be in \[1, V=16\], got 17"),
        (dict(clamp_p=1.0), ValueError, r"clamp_p must be in \[0, 1\), got 1.0"),
        (dict(clamp_p=-0.1), ValueError, r"clamp_p"),
        (dict(topk=3, clamp_p=0.2), ValueError, r"at most one of topk and clamp_p"),
        (dict(bias=torch.randn(15)), ValueError, r"bias must have shape \[V\]=\(16,\), got \(15,\)"),
        (dict(bias=torch.randn(16).double()), TypeError, r"bias dtype"),
    ],
    ids=["t0", "tneg", "tinf", "tnan", "softcap0", "softcapneg", "scaleinf", "backend", "topk0", "topk-big", "clamp1", "clampneg", "both-k", "bias-shape", "bias-dtype"],
)
def test_linear_bad_options(kw, exc, match):
    x, w, y = inputs()
    with pytest.raises(exc, match=match):
        fe.linear_logprobs(x, w, y, **{"backend": "torch", **kw})


def test_ignore_index_targets_are_allowed():
    x, w, y = inputs()
    y[0] = -100
    out = fe.linear_logprobs(x, w, y, backend="torch")
    assert out.logprobs[0] == 0


def test_devices_must_match():
    x, w, y = inputs()
    w_meta = w.to("meta")
    with pytest.raises(ValueError, match=r"weight is on meta but hidden is on cpu"):
        fe.linear_logprobs(x, w_meta, y, backend="torch")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, y = inputs()
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1"):
        fe.linear_logprobs(x, w, y, backend="triton")


@pytest.mark.parametrize(
    "logits, targets, kw, exc, match",
    [
        (torch.randn(3, 5), torch.zeros(4, dtype=torch.long), {}, ValueError, r"targets must have shape \(3,\)"),
        (torch.randn(3, 5), torch.full((3,), 5), {}, ValueError, r"found 5"),
        (torch.randn(3, 5), torch.zeros(3, dtype=torch.long), dict(temperature=0), ValueError, r"temperature"),
        (torch.randn(3, 5).long(), torch.zeros(3, dtype=torch.long), {}, TypeError, r"logits must be a floating tensor"),
        (torch.randn(3, 0), torch.zeros(3, dtype=torch.long), {}, ValueError, r"V >= 1"),
    ],
    ids=["shape", "range", "temp", "dtype", "v0"],
)
def test_logits_bad_input(logits, targets, kw, exc, match):
    with pytest.raises(exc, match=match):
        fe.logprobs_from_logits(logits, targets, **{"backend": "torch", **kw})
