"""What ``fused-entropy bench`` and ``pytest bench`` measure: one provider = one way to compute a loss.

A provider builds its inputs for a :class:`Case` and returns a :class:`Run` whose ``step()`` is one
forward + backward pass. Providers are grouped in families; rows of a family compute the same thing
(or, for the peers, the closest thing the peer offers) on the same inputs:

    linear_logprobs   per-token log-prob + entropy of ``hidden @ weight.T``; gradient through both
    clamped_entropy   log-prob + top-k clamped entropy (``topk=64``, ``clamp_p=0.3``)
    grpo              DAPO loss with an entropy bonus (Liger's GRPO loss has no entropy)
    logits            log-prob + entropy of logits already in memory (``logprobs_from_logits``)

Every family also has a ``floor`` row: the matrix products the fused algorithm must do, timed alone
at the fastest of several row chunkings (:data:`FLOOR_CHUNKS`; 4 GEMMs for ``linear_logprobs``:
forward, recompute, dX, dW; 3 for the single-pass GRPO loss: forward, dX, dW), so "x floor" is the
distance from the real limit of these products on this machine, not from the fused path's own
chunking. ``gemms`` is the number of ``[N, H] x [H, V]``-sized products a provider
performs, so its FLOPs are ``gemms * 2 * N * H * V`` (the elementwise softmax work is not counted).

The problem sizes of both harnesses (``fused-entropy bench`` and the pytest-benchmark suite under
``bench/``) are the presets of :data:`PRESETS`, one list for both.

Third-party providers import their package inside ``build``, so a missing package costs nothing
until that row is asked for; :func:`unavailable` gives the reason a row is skipped.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

FAMILIES = ("linear_logprobs", "clamped_entropy", "sampling", "grpo", "logits")

FAMILY_TITLES = {
    "linear_logprobs": "linear_logprobs: per-token log-prob + entropy of hidden @ weight.T, fwd+bwd",
    "clamped_entropy": "clamped entropy: log-prob + top-k clamped entropy (AEnt), fwd+bwd",
    "sampling": "sampling replay: log-prob + entropy + truncated log-prob (vLLM top-k/top-p/min-p), fwd+bwd",
    "grpo": "GRPO (DAPO) loss from hidden states, fwd+bwd",
    "logits": "logprobs_from_logits: log-prob + entropy of logits already in memory, fwd+bwd",
}

# TRL 1.16 trainer default (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`): vocabulary columns per tile
TRL_CHUNK_SIZE = 32768
GRPO_ENTROPY_COEF = 0.01
CLAMP_TOPK = 64
CLAMP_P = 0.3
# vLLM settings of the sampling rows (Qwen3's recommended top_k/top_p, and a common min_p)
SAMPLING_TOPK, SAMPLING_TOPP, SAMPLING_MINP = 20, 0.95, 0.05


@dataclass(frozen=True)
class Case:
    """One problem size. ``n`` tokens, hidden size ``h``, vocabulary ``v``; GRPO rows split the
    ``n`` tokens into ``n // seq_len`` sequences of ``seq_len`` tokens."""

    n: int = 2048
    h: int = 512
    v: int = 32768
    dtype: str = "float32"
    seq_len: int = 256

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nv_bytes(self) -> int:
        """Bytes of one fp32 ``[N, V]`` buffer: the unit of working memory."""
        return self.n * self.v * 4

    @property
    def seq(self) -> Tuple[int, int]:
        t = max(1, min(self.seq_len, self.n))
        return self.n // t, t

    def gemm_flops(self, gemms: int) -> int:
        return 2 * self.n * self.h * self.v * gemms


@dataclass
class Run:
    """``step()`` runs one forward + backward; ``leaves`` are the tensors whose ``.grad`` it fills
    (reset to None before every step, so gradients never accumulate and are counted once)."""

    step: Callable[[], object]
    leaves: List[torch.Tensor] = field(default_factory=list)
    info: Dict[str, object] = field(default_factory=dict)  # reported with the row (a floor's chunking)

    def reset(self) -> None:
        for t in self.leaves:
            t.grad = None

    @property
    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.leaves)


@dataclass(frozen=True)
class Provider:
    name: str  # unique, used by --providers and in the CSV
    family: str
    label: str  # printed in the table
    kind: str  # "fused" | "reference" | "peer" | "floor"
    build: Callable[[Case, torch.device], Run]
    gemms: Callable[[Case, torch.device], int]
    needs: Tuple[str, ...] = ()  # importable module names
    devices: FrozenSet[str] = frozenset({"cpu", "cuda"})
    device_note: str = ""  # why the row does not run on the other device
    check: Optional[Callable[[torch.device], Optional[str]]] = None
    full_warmup: bool = False  # warm up at full size (torch.compile specializes on shapes)
    mem_nv: float = 0.5  # rough working memory in fp32 [N, V] buffers, to skip cases that cannot fit
    preload: Tuple[str, ...] = ()  # modules a fork server imports once for this row (see .worker)
    cpu_note: str = ""  # what the row runs on CPU when that is not what it runs on a GPU (table note)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def linear_inputs(case: Case, device: torch.device, *, grad: bool = True, seed: int = 0):
    """``hidden [N, H] ~ N(0, 1)``, ``weight [V, H] ~ N(0, 1/H)`` (logits of unit scale), targets."""
    g = _gen(device, seed)
    dt = case.torch_dtype
    x = torch.randn(case.n, case.h, generator=g, device=device, dtype=dt)
    w = torch.randn(case.v, case.h, generator=g, device=device, dtype=dt).mul_(case.h ** -0.5)
    y = torch.randint(0, case.v, (case.n,), generator=g, device=device)
    return x.requires_grad_(grad), w.requires_grad_(grad), y


def grpo_lengths(case: Case) -> List[int]:
    """Unpadded length of each of the ``B`` sequences of ``grpo_inputs``: right padding on three
    sequences in four (0, 1/8, 2/8 and 3/8 of T)."""
    b, t = case.seq
    return [t - (i % 4) * (t // 8) for i in range(b)]


def grpo_inputs(case: Case, device: torch.device, seed: int = 0):
    """``_input [B, T, H]``, ``lin_weight``, ids ``[B, T]``, ``attention_mask [B, T]`` with right
    padding on three sequences in four (``grpo_lengths``), ``advantages [B]``."""
    x, w, y = linear_inputs(case, device, grad=False, seed=seed)
    b, t = case.seq
    rows = b * t
    x = x[:rows].reshape(b, t, case.h).contiguous().requires_grad_(True)
    w.requires_grad_(True)
    ids = y[:rows].reshape(b, t).contiguous()
    lengths = torch.tensor(grpo_lengths(case), device=device)
    mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).long()
    adv = torch.randn(b, generator=_gen(device, seed + 1), device=device, dtype=torch.float32)
    return x, w, ids, mask, adv


def dapo_loss(logp, entropy, mask, advantages, entropy_coef, eps_low=0.2, eps_high=0.2):
    """Plain torch DAPO loss (MATH.md section 4-5), on-policy (``old = logp.detach()``), with the bonus
    ``-entropy_coef * masked mean entropy``. Used on top of the non-fused log-prob paths."""
    m = mask.to(logp.dtype)
    r = torch.exp(logp - logp.detach())
    a = advantages[:, None]
    per_token = -torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
    denom = m.sum().clamp(min=1)
    loss = (per_token * m).sum() / denom
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * (entropy * m).sum() / denom
    return loss


# ---------------------------------------------------------------------------------------------
# linear_logprobs family
# ---------------------------------------------------------------------------------------------


def _fused_linear(backend: str, entropy: bool = True, topk=None, clamp_p=None):
    def build(case, device):
        from fused_entropy import linear_logprobs

        x, w, y = linear_inputs(case, device)

        def step():
            out = linear_logprobs(x, w, y, entropy=entropy, topk=topk, clamp_p=clamp_p, backend=backend)
            loss = out.logprobs.sum()
            if out.entropy is not None:
                loss = loss + out.entropy.sum()
            if out.clamped_entropy is not None:
                loss = loss + out.clamped_entropy.sum()
            loss.backward()

        return Run(step, [x, w])

    return build


def _fused_sampling(scale: float = 1.0, **sampling):
    """``linear_logprobs`` with a sampling truncation replayed; loss = logp + H + truncated logp (its
    finite entries: an untruncated target of the random ids is often outside the kept set). ``scale``
    multiplies the weight: logits of standard deviation ``scale`` (4: top-p 0.95 keeps a few hundred
    of 32k tokens, closer to a language model's than the flat unit-scale rows)."""
    def build(case, device):
        from fused_entropy import linear_logprobs

        x, w, y = linear_inputs(case, device)
        if scale != 1.0:
            w = w.detach().mul_(scale).requires_grad_()

        def step():
            out = linear_logprobs(x, w, y, **sampling)
            t = out.truncated_logprobs
            (out.logprobs.sum() + out.entropy.sum() + t.masked_fill(torch.isinf(t), 0).sum()).backward()

        return Run(step, [x, w])

    return build


def _reference_linear(compiled: bool = False, topk=None, clamp_p=None):
    def build(case, device):
        from fused_entropy import reference

        x, w, y = linear_inputs(case, device)
        clamped = topk is not None or clamp_p is not None

        def loss_fn(x, w, y):
            out = reference.linear_logprobs(x, w, y, entropy=not clamped, topk=topk, clamp_p=clamp_p)
            second = out.clamped_entropy if clamped else out.entropy
            return out.logprobs.sum() + second.sum()

        fn = torch.compile(loss_fn) if compiled else loss_fn

        def step():
            fn(x, w, y).backward()

        return Run(step, [x, w])

    return build


def _trl_linear(case, device):
    from trl.kernels import ChunkedLogProbFunction

    x, w, y = linear_inputs(case, device)

    def step():
        logp, ent = ChunkedLogProbFunction.apply(x, w, None, y, 1.0, TRL_CHUNK_SIZE, None, 1.0, ("entropy",))[:2]
        (logp.sum() + ent.sum()).backward()

    return Run(step, [x, w])


def liger_ce_apply(device: torch.device):
    """``(apply(x, w, y) -> (nll, entropy), note)`` for Liger's fused linear cross-entropy with
    ``return_entropy``. On sm_90 Liger 0.8.5 dispatches to CuTe DSL kernels that need
    ``nvidia-cutlass-dsl``; without it this times Liger's own chunked torch fallback, and ``note``
    says so (empty otherwise)."""
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as L

    try:
        L._resolve_implementation(device)
    except ImportError as e:
        fallback = getattr(L, "_FusedLinearPPOFallbackFunction", None)
        if fallback is None:
            raise
        return (lambda x, w, y: fallback.apply(x, w, y, 1.0, -100, True),
                f" [Liger's torch fallback: {str(e).split(':')[0][:60]}]")
    return lambda x, w, y: L.LigerFusedLinearScaledCrossEntropyFunction.apply(x, w, y, 1.0, -100, 1, True), ""


def _liger_ce(case, device):
    x, w, y = linear_inputs(case, device)
    apply, _ = liger_ce_apply(device)

    def step():
        nll, ent = apply(x, w, y)
        (ent.sum() - nll.sum()).backward()

    return Run(step, [x, w])


def torch_chunk_rows(case: Case) -> int:
    """Rows per chunk of the torch backend's ``linear_logprobs`` on this case (its workspace bound)."""
    from fused_entropy.backends.torch_chunked import chunk_rows

    return chunk_rows(case.n, case.v, itemsize=8 if case.dtype == "float64" else 4)


# Row chunkings a floor tries on CPU, up to FLOOR_SELECT_ROWS rows and a block of at most
# FLOOR_MAX_BLOCK_BYTES; it chooses on the first FLOOR_SELECT_ROWS rows (time per row does not depend
# on N) by the median of FLOOR_SELECT_PASSES interleaved passes. On CUDA: 1024 rows to N, on all N.
FLOOR_CHUNKS = (32, 128, 256, 512, 1024)
FLOOR_SELECT_ROWS = 1024
FLOOR_SELECT_PASSES = 3
FLOOR_MAX_BLOCK_BYTES = {"cpu": 1 << 30, "cuda": 16 << 30}


def floor_plan(case: Case, device: torch.device) -> Tuple[List[int], int]:
    """(candidate rows per chunk, rows the choice is timed on)."""
    elt = torch.empty((), dtype=case.torch_dtype).element_size()
    if device.type == "cuda":
        sel = case.n
        cands = [1024 << i for i in range(12) if (1024 << i) < sel] + [sel]
    else:
        sel = min(case.n, FLOOR_SELECT_ROWS)
        cands = [c for c in FLOOR_CHUNKS if c < sel] + [sel]
    fit = [c for c in cands if c * case.v * elt <= FLOOR_MAX_BLOCK_BYTES.get(device.type, 1 << 30)]
    return (fit or cands[:1]), sel


def _gemm_products(x, w, z, gx, gw, gemms: int, rows: int, n: int) -> None:
    """Per chunk of ``rows`` rows: ``z = x W^T`` (``gemms - 2`` times), ``dX = z W``, ``dW += z^T x``."""
    gw.zero_()
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        xc, zc = x[sl], z[: sl.stop - sl.start]
        for _ in range(gemms - 2):
            torch.mm(xc, w.T, out=zc)
        torch.mm(zc, w, out=gx[sl])
        gw.addmm_(zc.T, xc)


def _wall(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _gemm_floor(gemms: int):
    """The products alone, into preallocated buffers, at the fastest row chunking of
    :func:`floor_plan`: chosen by the median of ``FLOOR_SELECT_PASSES`` interleaved passes on the
    first ``FLOOR_SELECT_ROWS`` rows (CPU), then timed on all N rows. ``info``: the chunking chosen
    and the candidates' median seconds per row."""

    def build(case, device):
        x, w, _ = linear_inputs(case, device, grad=False)
        x, w = x.detach(), w.detach()
        cands, sel_n = floor_plan(case, device)
        gx, gw = torch.empty_like(x), torch.empty_like(w)
        times: Dict[int, List[float]] = {c: [] for c in cands}
        for _ in range(FLOOR_SELECT_PASSES):
            for c in cands:
                z = torch.empty(c, case.v, device=device, dtype=x.dtype)
                _gemm_products(x, w, z, gx, gw, gemms, c, c)  # touch the block before timing
                times[c].append(_wall(lambda: _gemm_products(x, w, z, gx, gw, gemms, c, sel_n), device) / sel_n)
                del z
        per_row = {c: statistics.median(t) for c, t in times.items()}
        best = min(per_row, key=per_row.get)
        z = torch.empty(min(best, case.n), case.v, device=device, dtype=x.dtype)
        return Run(lambda: _gemm_products(x, w, z, gx, gw, gemms, best, case.n), [],
                   info={"chunk_rows": best, "candidates_s_per_row": per_row})

    return build


# ---------------------------------------------------------------------------------------------
# GRPO family
# ---------------------------------------------------------------------------------------------


def _find_linear_grpo_loss():
    import fused_entropy

    cls = getattr(fused_entropy, "LinearGRPOLoss", None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module("fused_entropy.modules"), "LinearGRPOLoss", None)
        except ImportError:
            cls = None
    return cls


def _check_linear_grpo(device) -> Optional[str]:
    if _find_linear_grpo_loss() is None:
        return "fused_entropy.LinearGRPOLoss is not in this build"
    return None


def _fused_grpo(entropy_coef: float):
    def build(case, device):
        cls = _find_linear_grpo_loss()
        loss_fn = cls(beta=0.0, use_ref_model=False, loss_type="dapo", entropy_coef=entropy_coef)
        x, w, ids, mask, adv = grpo_inputs(case, device)

        def step():
            loss, _ = loss_fn(x, w, ids, mask, adv)
            loss.backward()

        return Run(step, [x, w])

    return build


def _liger_grpo(case, device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    # compiled=False: Liger compiles only the per-token loss math, which is negligible next to the GEMMs,
    # and compiling on CPU would time the C++ toolchain
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo", compiled=device.type == "cuda")
    x, w, ids, mask, adv = grpo_inputs(case, device)

    def step():
        loss, _ = loss_fn(x, w, ids, mask, adv)
        loss.backward()

    return Run(step, [x, w])


def _trl_grpo(case, device):
    from trl.kernels import ChunkedLogProbFunction

    x, w, ids, mask, adv = grpo_inputs(case, device)
    b, t = ids.shape

    def step():
        logp, ent = ChunkedLogProbFunction.apply(
            x.reshape(b * t, -1), w, None, ids.reshape(-1), 1.0, TRL_CHUNK_SIZE, None, 1.0, ("entropy",)
        )[:2]
        dapo_loss(logp.view(b, t), ent.view(b, t), mask, adv, GRPO_ENTROPY_COEF).backward()

    return Run(step, [x, w])


def _reference_grpo(case, device):
    from fused_entropy import reference

    x, w, ids, mask, adv = grpo_inputs(case, device)

    def step():
        out = reference.linear_logprobs(x, w, ids)
        dapo_loss(out.logprobs, out.entropy, mask, adv, GRPO_ENTROPY_COEF).backward()

    return Run(step, [x, w])


# ---------------------------------------------------------------------------------------------
# logits family
# ---------------------------------------------------------------------------------------------


def logits_inputs(case: Case, device: torch.device, seed: int = 0):
    g = _gen(device, seed)
    z = torch.randn(case.n, case.v, generator=g, device=device, dtype=case.torch_dtype).requires_grad_(True)
    y = torch.randint(0, case.v, (case.n,), generator=g, device=device)
    return z, y


def _fused_logits(case, device):
    from fused_entropy import logprobs_from_logits

    z, y = logits_inputs(case, device)

    def step():
        out = logprobs_from_logits(z, y, entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()

    return Run(step, [z])


def _reference_logits(case, device):
    from fused_entropy import reference

    z, y = logits_inputs(case, device)

    def step():
        out = reference.logprobs_from_logits(z, y, entropy=True)
        (out.logprobs.sum() + out.entropy.sum()).backward()

    return Run(step, [z])


def _trl_logits(case, device):
    from trl.kernels import selective_log_softmax_and_entropy

    z, y = logits_inputs(case, device)

    def step():
        logp, ent = selective_log_softmax_and_entropy(z, y)
        (logp.sum() + ent.sum()).backward()

    return Run(step, [z])


# ---------------------------------------------------------------------------------------------
# GEMM counts and the registry
# ---------------------------------------------------------------------------------------------


def _const(k: int):
    return lambda case, device: k


def _fused_clamped_gemms(case: Case, device: torch.device) -> int:
    """GEMM passes of the clamped rows. torch backend: the top-k threshold comes from each logit block
    it already holds, so 4 as for plain entropy. Triton (CUDA): the forward's radix-select passes over
    recomputed tiles (``_launch.radix_gemm_passes``) plus the backward's 3."""
    if device.type == "cuda":
        try:
            from fused_entropy import _launch

            return int(_launch.radix_gemm_passes(case.torch_dtype)) + 3
        except (ImportError, AttributeError):
            pass
    return 4


def _check_triton_backend(device) -> Optional[str]:
    if importlib.util.find_spec("fused_entropy.backends.triton") is None:
        return "fused_entropy.backends.triton is not in this build"
    return None


# TRL's ChunkedLogProbFunction runs its Triton row kernel on CUDA/XPU only; elsewhere a torch fallback
# folds [4096 x 32768] logit tiles with whole-tile temporaries, i.e. every logit of N <= 4096 tokens at
# V = 32768 at once
TRL_CPU_NOTE = ("on CPU TRL runs its torch fallback: [4096 x 32768] logit tiles plus whole-tile temporaries, "
                "so all N x V logits of up to 4096 tokens are materialized at once")
# TRL's backward imports trl.trainer.utils (and with it transformers) on its first call
_TRL = ("trl.kernels", "trl.trainer.utils")

PROVIDERS: Dict[str, Provider] = {}


def _add(p: Provider) -> None:
    assert p.name not in PROVIDERS, p.name
    PROVIDERS[p.name] = p


# linear_logprobs
_add(Provider("floor", "linear_logprobs", "GEMM floor: 4 GEMMs", "floor", _gemm_floor(4), _const(4), mem_nv=0.3))
_add(Provider("fused", "linear_logprobs", "fused_entropy.linear_logprobs", "fused", _fused_linear("auto"), _const(4),
              check=lambda d: _check_triton_backend(d) if d.type == "cuda" else None))
_add(Provider("fused-torch", "linear_logprobs", "fused_entropy.linear_logprobs [torch]", "fused", _fused_linear("torch"),
              _const(4), devices=frozenset({"cuda"}), device_note="same as 'fused' on CPU"))
_add(Provider("fused-logp", "linear_logprobs", "fused_entropy.linear_logprobs, logp only", "fused",
              _fused_linear("auto", entropy=False), _const(4),
              check=lambda d: _check_triton_backend(d) if d.type == "cuda" else None))
_add(Provider("reference", "linear_logprobs", "reference (materialized, eager)", "reference", _reference_linear(),
              _const(3), mem_nv=6))
_add(Provider("reference-compile", "linear_logprobs", "reference (materialized, torch.compile)", "reference",
              _reference_linear(compiled=True), _const(3), full_warmup=True, mem_nv=6))
_add(Provider("trl", "linear_logprobs", "TRL ChunkedLogProbFunction", "peer", _trl_linear, _const(4),
              needs=("trl", "transformers"), mem_nv=2.5, preload=_TRL, cpu_note=TRL_CPU_NOTE))
_add(Provider("liger-ce", "linear_logprobs", "Liger FusedLinearScaledCE(return_entropy)", "peer", _liger_ce, _const(4),
              needs=("liger_kernel",), mem_nv=2.5, preload=("liger_kernel.ops.fused_linear_scaled_cross_entropy",)))

# clamped entropy: time relative to the plain-entropy 'fused' row
_add(Provider("fused-topk64", "clamped_entropy", f"fused_entropy, topk={CLAMP_TOPK}", "fused",
              _fused_linear("auto", entropy=False, topk=CLAMP_TOPK), _fused_clamped_gemms,
              check=lambda d: _check_triton_backend(d) if d.type == "cuda" else None))
_add(Provider("fused-clamp0.3", "clamped_entropy", f"fused_entropy, clamp_p={CLAMP_P}", "fused",
              _fused_linear("auto", entropy=False, clamp_p=CLAMP_P), _fused_clamped_gemms,
              check=lambda d: _check_triton_backend(d) if d.type == "cuda" else None))
_add(Provider("reference-topk64", "clamped_entropy", f"reference topk={CLAMP_TOPK} (eager)", "reference",
              _reference_linear(topk=CLAMP_TOPK), _const(3), mem_nv=6))
_add(Provider("reference-clamp0.3", "clamped_entropy", f"reference clamp_p={CLAMP_P} (eager)", "reference",
              _reference_linear(clamp_p=CLAMP_P), _const(3), mem_nv=7))

# sampling replay: time relative to the plain 'fused' row (the logits of the bench cases are of unit
# scale, a nearly flat distribution: top-p keeps most of the vocabulary, its search's worst case)
_add(Provider(f"fused-sampling-topk{SAMPLING_TOPK}", "sampling", f"fused_entropy, sampling_top_k={SAMPLING_TOPK}",
              "fused", _fused_sampling(sampling_top_k=SAMPLING_TOPK), _const(4)))
_add(Provider(f"fused-sampling-topp{SAMPLING_TOPP}", "sampling", f"fused_entropy, sampling_top_p={SAMPLING_TOPP}",
              "fused", _fused_sampling(sampling_top_p=SAMPLING_TOPP), _const(4)))
_add(Provider(f"fused-sampling-topp{SAMPLING_TOPP}-peaked", "sampling",
              f"fused_entropy, sampling_top_p={SAMPLING_TOPP}, logits x4", "fused",
              _fused_sampling(4.0, sampling_top_p=SAMPLING_TOPP), _const(4)))
_add(Provider("fused-sampling-vllm", "sampling",
              f"fused_entropy, top_k={SAMPLING_TOPK} top_p={SAMPLING_TOPP} min_p={SAMPLING_MINP}", "fused",
              _fused_sampling(sampling_top_k=SAMPLING_TOPK, sampling_top_p=SAMPLING_TOPP,
                              sampling_min_p=SAMPLING_MINP), _const(4)))

# GRPO
_add(Provider("floor-grpo", "grpo", "GEMM floor: 3 GEMMs", "floor", _gemm_floor(3), _const(3), mem_nv=0.3))
_add(Provider("fused-grpo", "grpo", f"LinearGRPOLoss, entropy_coef={GRPO_ENTROPY_COEF}", "fused",
              _fused_grpo(GRPO_ENTROPY_COEF), _const(3), check=_check_linear_grpo))
_add(Provider("fused-grpo-noent", "grpo", "LinearGRPOLoss, no entropy", "fused", _fused_grpo(0.0), _const(3),
              check=_check_linear_grpo))
_add(Provider("liger-grpo", "grpo", "Liger LigerFusedLinearGRPOLoss (no entropy)", "peer", _liger_grpo, _const(4),
              needs=("liger_kernel",), mem_nv=1, preload=("liger_kernel.chunked_loss",)))
_add(Provider("trl-grpo", "grpo", "TRL ChunkedLogProbFunction + DAPO + bonus", "peer", _trl_grpo, _const(4),
              needs=("trl", "transformers"), mem_nv=2.5, preload=_TRL, cpu_note=TRL_CPU_NOTE))
_add(Provider("reference-grpo", "grpo", "reference + DAPO + bonus (eager)", "reference", _reference_grpo, _const(3),
              mem_nv=7))

# logits already in memory
_add(Provider("fused-logits", "logits", "fused_entropy.logprobs_from_logits", "fused", _fused_logits, _const(0),
              check=lambda d: _check_triton_backend(d) if d.type == "cuda" else None))
_add(Provider("reference-logits", "logits", "reference (eager)", "reference", _reference_logits, _const(0), mem_nv=5))
_add(Provider("trl-logits", "logits", "TRL selective_log_softmax_and_entropy", "peer", _trl_logits, _const(0),
              needs=("trl", "transformers", "triton"), devices=frozenset({"cuda"}),
              device_note="CUDA only (a Triton kernel)"))


def unavailable(p: Provider, device: torch.device) -> Optional[str]:
    """Why provider ``p`` cannot run on ``device`` here, or None when it can."""
    if device.type not in p.devices:
        return p.device_note or f"does not run on {device.type}"
    for mod in p.needs:
        if importlib.util.find_spec(mod) is None:
            return f"package '{mod}' is not installed (pip install 'fused-entropy[bench]')"
    if p.check is not None:
        return p.check(device)
    return None


def family_providers(family: str) -> List[str]:
    return [name for name, p in PROVIDERS.items() if p.family == family]


# ---------------------------------------------------------------------------------------------
# presets: the one case list of `fused-entropy bench` and of the pytest-benchmark suite (bench/)
# ---------------------------------------------------------------------------------------------

QUICK_PROVIDERS = (
    "floor", "fused", "fused-torch", "fused-logp", "reference", "trl", "liger-ce",
    "fused-topk64", "fused-clamp0.3",
    f"fused-sampling-topk{SAMPLING_TOPK}", f"fused-sampling-topp{SAMPLING_TOPP}",
    f"fused-sampling-topp{SAMPLING_TOPP}-peaked", "fused-sampling-vllm",
    "floor-grpo", "fused-grpo", "liger-grpo", "trl-grpo",
    "fused-logits", "reference-logits", "trl-logits",
)


@dataclass(frozen=True)
class Preset:
    """Cases (per device type) and providers. A sweep varies N at the base V and V at the base N."""

    name: str
    about: str
    base: Dict[str, Case]
    providers: Tuple[str, ...]
    sweep_n: Tuple[int, ...] = ()
    sweep_v: Tuple[int, ...] = ()

    def cases(self, device_type: str, base: Optional[Case] = None, sweep_n=None, sweep_v=None) -> List[Case]:
        base = base or self.base[device_type]
        ns = self.sweep_n if sweep_n is None else tuple(sweep_n)
        vs = self.sweep_v if sweep_v is None else tuple(sweep_v)
        if not ns and not vs:
            return [base]
        out = [dataclasses.replace(base, n=n) for n in ns] + [dataclasses.replace(base, v=v) for v in vs]
        return list(dict.fromkeys(out))


_CPU_CASE = Case(n=2048, h=512, v=32768, dtype="float32", seq_len=256)
_CUDA_CASE = Case(n=8192, h=4096, v=131072, dtype="bfloat16", seq_len=1024)
PRESETS: Dict[str, Preset] = {
    "quick": Preset("quick", "one case, the main rows", {"cpu": _CPU_CASE, "cuda": _CUDA_CASE}, QUICK_PROVIDERS),
    "sweep": Preset("sweep", "N 1k-32k at the base V, V 32k-256k at the base N, every row",
                    {"cpu": _CPU_CASE, "cuda": _CUDA_CASE}, tuple(PROVIDERS),
                    sweep_n=(1024, 2048, 4096, 8192, 16384, 32768), sweep_v=(32768, 65536, 131072, 262144)),
    "small": Preset("small", "one smaller case, every row (the pytest-benchmark suite's default)",
                    {"cpu": Case(n=512, h=256, v=8192, dtype="float32", seq_len=128),
                     "cuda": Case(n=4096, h=4096, v=65536, dtype="bfloat16", seq_len=512)}, tuple(PROVIDERS)),
}
