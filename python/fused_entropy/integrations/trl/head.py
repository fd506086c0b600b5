"""The fused head: a ``fused_entropy=HeadRequest(...)`` mode on the model's forward.

In that mode the forward runs the backbone and applies :func:`fused_entropy.linear_logprobs` to the
completion positions' last hidden states with the output embedding's weight, so no ``[B, T, V]``
logits are allocated and the ``lm_head`` module is never called.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._types import TokenStats
from ..._validate import check_mask, check_transform
from ...functional import linear_logprobs


class HeadRequest(NamedTuple):
    """What one ``model(..., fused_entropy=HeadRequest(...))`` call computes.

    ``logits_to_keep``: score the last ``K`` tokens (the completion), predicted from positions
    ``L-K-1 .. L-2``. ``entropy``/``clamped``: also return the full / clamped entropy.
    ``sampling``: ``(top_k, top_p, min_p)``; ``logprobs`` are then the truncated log-probs (MATH.md
    section 8; a target the truncation drops keeps its full log-prob).
    """

    logits_to_keep: int
    entropy: bool = False
    clamped: bool = False
    sampling: Optional[tuple] = None  # (top_k, top_p, min_p): log-probs under the sampler's truncation


def logit_transform_of(config) -> tuple:
    """``(softcap, logit_scale)`` that the model applies to its logits, read from the config.

    The same fields TRL's fused head reads: ``final_logit_softcapping``; ``logit_scale``,
    ``output_multiplier``, ``lm_head_multiplier`` or ``logits_scaling`` (a divisor, except for
    HyperCLOVA X where it multiplies).
    """
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(tc, "final_logit_softcapping", None)
    scale = getattr(tc, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(tc, name, None)
    if scale is None and getattr(tc, "logits_scaling", None) is not None:
        scale = tc.logits_scaling if getattr(tc, "model_type", None) == "hyperclovax" else 1.0 / tc.logits_scaling
    softcap = None if softcap is None else float(softcap)
    scale = 1.0 if scale is None else float(scale)
    check_transform(1.0, softcap, scale, names=("temperature", "final_logit_softcapping", "the model's logit scale"))
    return softcap, scale


def kernel_function(spec: str, name: str = "linear_logprobs"):
    """``name`` from a Hub function kernel built from this package's ``hub/fused_entropy`` project.

    ``spec``: ``"owner/repo@revision"`` (loaded with ``kernels.get_kernel(repo, revision=revision)``;
    pin a commit sha so every run of a job gets the same code) or the path of a local build directory
    (``kernels.get_local_kernel``, e.g. the output of ``scripts/build_hub_kernel.py``). Raises
    ImportError without the ``kernels`` package and ValueError for a Hub repo without a revision.
    """
    import os

    try:
        import kernels as hub
        hub.get_local_kernel  # noqa: B018 (a folder named kernels/ on sys.path is not the package)
    except (ImportError, AttributeError) as e:
        raise ImportError("fused_kernel needs the `kernels` package (pip install kernels), importable as "
                          "`kernels` (not shadowed by a folder of that name on sys.path)") from e
    if os.path.isdir(spec):
        from pathlib import Path

        mod = hub.get_local_kernel(Path(spec))
    else:
        from .config import pinned_hub_spec

        if not pinned_hub_spec(spec):
            raise ValueError(f"fused_kernel must be 'owner/repo@<commit sha>' (a pinned commit: 7-40 hex digits, "
                             f"not a branch) or a local build directory, got {spec!r}")
        repo, _, revision = spec.partition("@")
        mod = hub.get_kernel(repo, revision=revision)
    return getattr(mod, name)


def install_fused_head(model, *, temperature: float, topk=None, clamp_p=None, backend: str = "auto",
                       linear_logprobs=linear_logprobs) -> None:
    """Give ``model.forward`` a ``fused_entropy=HeadRequest(...)`` mode; other calls are unchanged.

    ``linear_logprobs``: the function the head calls (this package's, or one taken from a Hub
    function kernel with :func:`kernel_function`).

    In that mode the forward returns :class:`fused_entropy.TokenStats` of ``[B, K]`` tensors (zero where
    the target is padding, i.e. ``attention_mask == 0``) computed from the backbone's last hidden
    states and the output embedding's weight by :func:`linear_logprobs`, outside autocast (fp32
    statistics whatever the model dtype).
    """
    import functools
    import types

    softcap, logit_scale = logit_transform_of(model.config)
    check_transform(temperature, softcap, logit_scale)  # fail at install, not in the first step
    previous = model.forward

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, fused_entropy: Optional[HeadRequest] = None, **kwargs):
        if fused_entropy is None:
            return previous(*args, **kwargs)
        input_ids, attention_mask = kwargs["input_ids"], kwargs["attention_mask"]
        check_mask("attention_mask", attention_mask, input_ids.shape, " (the shape of input_ids)")
        k = fused_entropy.logits_to_keep
        if not 0 < k < input_ids.shape[1]:
            raise ValueError(f"logits_to_keep must be in [1, L-1] = [1, {input_ids.shape[1] - 1}], got {k}")
        kwargs["use_cache"] = False
        # Looked up per call: FSDP and PEFT replace the backbone and head after this is installed.
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, -k - 1 : -1]
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if type(weight).__name__ == "DTensor":  # FSDP2: gather the head like TRL's fused head does
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        targets = input_ids[:, -k:].masked_fill(attention_mask[:, -k:] == 0, -100).to(weight.device)
        valid = targets != -100
        # Only valid rows are scored (prompt/padding rows would cost GEMM work for nothing).
        h = hidden.to(device=weight.device, dtype=weight.dtype)[valid]
        with torch.autocast(device_type=weight.device.type, enabled=False):
            stats = linear_logprobs(
                h, weight, targets[valid], bias=bias, temperature=temperature, softcap=softcap,
                logit_scale=logit_scale, entropy=fused_entropy.entropy,
                topk=topk if fused_entropy.clamped else None, clamp_p=clamp_p if fused_entropy.clamped else None,
                backend=backend,
                **dict(zip(("sampling_top_k", "sampling_top_p", "sampling_min_p"), fused_entropy.sampling or ())),
            )
            stats = stats._replace(logprobs=stats.policy_logprobs())
        scatter = lambda x: None if x is None else x.new_zeros(valid.shape).masked_scatter(valid, x)  # noqa: E731
        return TokenStats(*(scatter(x) for x in stats))

    model.forward = types.MethodType(forward, model)

