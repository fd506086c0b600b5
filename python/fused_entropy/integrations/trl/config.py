"""``FusedEntropyGRPOConfig``: ``GRPOConfig`` plus the fused-entropy options, and their checks.

:func:`validate_options` takes a ``FusedEntropyGRPOConfig`` or a plain ``GRPOConfig`` (whose added
options are their defaults, read through :func:`option`) and raises ``ValueError`` naming the option,
with no model needed; the trainer calls it again at construction. :func:`build_controller` and
:func:`build_repo` make the controllers the options describe.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from trl import GRPOConfig

from ..._grpo.losses import ENTROPY_SOURCES, GRPO_BACKENDS  # noqa: F401 (ENTROPY_SOURCES: re-exported)
from ..._grpo.options import GRPOOptions
from ..._validate import resolve_k
from ...control import AdaptiveEntropyCoef, AEntCoef, REPOZeta, StaticEntropyCoef

CONTROLLERS = (None, "static", "adaptive", "aent")


@dataclass
class FusedEntropyGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the fused-entropy options (every TRL field keeps its meaning).

    Loss types: TRL's ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``, ``luspo``,
    ``vespo``, plus ``clip_cov`` and ``kl_cov`` (token-level; normalized like ``dapo``).
    """

    entropy_source: str = field(
        default="full",
        metadata={"help": "Entropy used by the entropy bonus, its controller and the top-entropy mask: 'full', or "
                  "'clamped' (entropy of the softmax over the top-k logits; needs `topk` or `clamp_p`)."},
    )
    topk: Optional[int] = field(
        default=None, metadata={"help": "Size k of the clamped set (the k largest logits). At most one of topk, clamp_p."}
    )
    clamp_p: Optional[float] = field(
        default=None,
        metadata={"help": "AEnt clamp: drop the floor(clamp_p * V) lowest logits (k = V - floor(p V)); e.g. 0.33."},
    )
    entropy_controller: Optional[str] = field(
        default=None,
        metadata={"help": "Controller of the entropy-bonus coefficient: 'static' (entropy_coef), 'adaptive' "
                  "(Skywork-OR1/TRL rule with entropy_target, entropy_coef_delta, entropy_coef_min/max), 'aent' "
                  "(AEnt band rule). None: 'adaptive' if use_adaptive_entropy, 'static' if entropy_coef != 0, "
                  "else no bonus. `entropy_coef` is the initial coefficient for every controller."},
    )
    adaptive_entropy_strict: bool = field(
        default=False, metadata={"help": "Adaptive controller: use `entropy < target` (Skywork-OR1's code) instead of <=."}
    )
    adaptive_entropy_start_enabled: bool = field(
        default=False,
        metadata={"help": "Adaptive controller: apply the bonus in the first step (Skywork-OR1) instead of waiting "
                  "for the first measurement (TRL)."},
    )
    entropy_low: Optional[float] = field(default=None, metadata={"help": "AEnt: lower edge of the entropy band."})
    entropy_high: Optional[float] = field(default=None, metadata={"help": "AEnt: upper edge of the entropy band."})
    entropy_coef_lr: Optional[float] = field(default=None, metadata={"help": "AEnt: step size of the coefficient."})
    entropy_coef_warmup: int = field(default=0, metadata={"help": "AEnt: optimizer steps before the first update."})
    entropy_coef_reg: float = field(default=0.0, metadata={"help": "AEnt: pull of the coefficient toward its initial value."})
    clip_cov_ratio: float = field(default=2e-4, metadata={"help": "Clip-Cov: fraction of tokens whose gradient is cut."})
    clip_cov_lb: float = field(default=1.0, metadata={"help": "Clip-Cov: lower covariance bound."})
    clip_cov_ub: float = field(default=5.0, metadata={"help": "Clip-Cov: upper covariance bound."})
    kl_cov_ratio: float = field(default=2e-4, metadata={"help": "KL-Cov: fraction of tokens that get the KL penalty."})
    ppo_kl_coef: float = field(default=1.0, metadata={"help": "KL-Cov: coefficient of |log r| on the selected tokens."})
    use_repo_r: bool = field(
        default=False, metadata={"help": "REPO-R: shape advantages with the log-prob of the sampled token (arXiv 2603.11682)."}
    )
    repo_zeta: float = field(default=0.01, metadata={"help": "REPO-R: initial zeta."})
    repo_zeta_min: float = field(default=1e-4, metadata={"help": "REPO-R: lower bound of zeta."})
    repo_zeta_max: float = field(default=0.05, metadata={"help": "REPO-R: upper bound of zeta."})
    repo_entropy_target: Optional[float] = field(
        default=None, metadata={"help": "REPO-R: entropy target for zeta (None: the first step's entropy)."}
    )
    sampling_replay: bool = field(
        default=False,
        metadata={"help": "Take every log-prob the trainer computes under the sampler's truncation (top_k, top_p, "
                  "min_p of this config, vLLM's rule), so the vLLM importance ratio against processed log-probs "
                  "(vLLM logprobs_mode='processed_logprobs') carries no log S. Needs use_vllm and "
                  "vllm_importance_sampling_correction."},
    )
    fused_kernel: Optional[str] = field(
        default=None,
        metadata={"help": "Take the head's linear_logprobs from a Hub function kernel of this package: "
                  "'owner/repo@<commit sha>' (kernels.get_kernel, pinned) or a local build directory. "
                  "None: the installed package."},
    )
    fused_backend: str = field(
        default="auto", metadata={"help": "fused-entropy backend: 'auto' (Triton on CUDA, torch elsewhere), 'torch', 'triton'."}
    )

    def __post_init__(self):
        super().__post_init__()
        validate_options(self)


_EXTRA_DEFAULTS = {f.name: f.default for f in fields(FusedEntropyGRPOConfig) if f.name not in {g.name for g in fields(GRPOConfig)}}


def option(args, name):
    """An added option from ``args``, or its default when ``args`` is a plain ``GRPOConfig``."""
    return getattr(args, name, _EXTRA_DEFAULTS[name])


def _controller_kind(args) -> Optional[str]:
    kind = option(args, "entropy_controller")
    if kind is not None:
        return kind
    if args.use_adaptive_entropy:
        return "adaptive"
    return "static" if args.entropy_coef != 0.0 else None


def pinned_hub_spec(spec: str) -> bool:
    """``owner/repo@<commit sha>``: a revision of 7-40 hex digits (a branch or tag can move)."""
    import re

    return re.fullmatch(r"[^/@\s]+/[^/@\s]+@[0-9a-fA-F]{7,40}", spec) is not None


def sampling_truncation(args) -> Optional[tuple]:
    """``(top_k, top_p, min_p)`` of a GRPOConfig as ``linear_logprobs``'s ``sampling_*`` values (None for a
    rule that is off: TRL's ``top_k`` 0 or -1, ``top_p`` 1, ``min_p`` None or 0), or None when none
    truncates."""
    k = args.top_k if args.top_k is not None and args.top_k > 0 else None
    p = args.top_p if args.top_p is not None and args.top_p < 1.0 else None
    mp = args.min_p if args.min_p else None
    return None if k is None and p is None and mp is None else (k, p, mp)


def loss_options(args) -> GRPOOptions:
    """The ``grpo_loss`` options a config fixes for the whole run, as the trainer passes them: TRL's
    fields as ``GRPOTrainer`` reads them (``epsilon_high`` falls back to ``epsilon``), the added
    options, and TRL 1.16's normalizations. Building them checks them (``GRPOOptions``)."""
    return GRPOOptions(
        loss_type=args.loss_type, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        delta=args.delta, beta=args.beta, use_bias_correction_kl=bool(args.use_bias_correction_kl),
        importance_sampling_level=args.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
        max_completion_length=args.max_completion_length, top_entropy_quantile=args.top_entropy_quantile,
        entropy_source=option(args, "entropy_source"), luspo_normalization="trl",
        clip_cov_ratio=option(args, "clip_cov_ratio"), clip_cov_lb=option(args, "clip_cov_lb"),
        clip_cov_ub=option(args, "clip_cov_ub"), kl_cov_ratio=option(args, "kl_cov_ratio"),
        ppo_kl_coef=option(args, "ppo_kl_coef"), backend=option(args, "fused_backend"), bonus_normalization="mean",
    )


# generation settings that change vLLM's sampling distribution beyond what the replay reproduces
_NOT_REPLAYED = ("top_k", "top_p", "min_p", "temperature", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "logit_bias", "allowed_token_ids", "bad_words", "logits_processors")


def _check_replayable(args) -> None:
    """sampling_replay reproduces temperature, top_k, top_p and min_p of the config: their ranges, and
    nothing else that reshapes the sampler's distribution (a penalty, generation_kwargs overrides)."""
    k, p, mp = args.top_k, args.top_p, args.min_p
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < -1):
        raise ValueError(f"top_k must be an int >= 1, or 0 / -1 for no top-k, got {k!r}")
    if p is not None and not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: no top-p), got {p!r}")
    if mp is not None and not 0.0 <= mp <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 or None: no min-p), got {mp!r}")
    penalty = getattr(args, "repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        raise ValueError(f"sampling_replay=True cannot replay repetition_penalty={penalty} (it reshapes vLLM's "
                         "distribution per sequence); set repetition_penalty=1.0 or sampling_replay=False")
    gen = getattr(args, "generation_kwargs", None) or {}
    if isinstance(gen, dict):
        clash = sorted(set(gen) & set(_NOT_REPLAYED))
        if clash:
            raise ValueError(f"sampling_replay=True replays the config's top_k/top_p/min_p/temperature; "
                             f"generation_kwargs overrides {clash}, which the replay would not see")


def validate_options(args) -> None:
    """Reject option combinations the trainer cannot honour, naming the option (no model needed).

    The loss options are checked by building them (:func:`loss_options`); the checks here are the
    adapter's own: the clamped set, the controllers, and what only a TRL config can get wrong."""
    src = option(args, "entropy_source")
    topk, clamp_p = option(args, "topk"), option(args, "clamp_p")
    if topk is not None and clamp_p is not None:
        raise ValueError(f"give at most one of topk and clamp_p, got topk={topk} and clamp_p={clamp_p}")
    if src == "clamped" and topk is None and clamp_p is None:
        raise ValueError("entropy_source='clamped' needs topk or clamp_p (the size of the clamped set)")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be an int >= 1, got {topk!r}")
    if clamp_p is not None:
        resolve_k(None, clamp_p, 1 << 30)  # range check only; k needs the vocabulary size
    kind = option(args, "entropy_controller")
    if kind not in CONTROLLERS:
        raise ValueError(f"entropy_controller must be one of {CONTROLLERS}, got {kind!r}")
    if args.use_adaptive_entropy and kind not in (None, "adaptive"):
        raise ValueError(f"use_adaptive_entropy=True conflicts with entropy_controller={kind!r}; set one of them")
    if kind == "aent":
        missing = [n for n in ("entropy_low", "entropy_high", "entropy_coef_lr") if option(args, n) is None]
        if missing:
            raise ValueError(f"entropy_controller='aent' needs {', '.join(missing)} (AEnt's band and step size)")
    build_controller(args)  # the controllers check their own numbers (bounds, init within bounds)
    spec = option(args, "fused_kernel")
    if spec is not None:
        import os

        if not isinstance(spec, str) or not (os.path.isdir(spec) or pinned_hub_spec(spec)):
            raise ValueError(f"fused_kernel must be 'owner/repo@<commit sha>' (a pinned commit: 7-40 hex digits, "
                             f"not a branch) or a local build directory, got {spec!r}")
    if option(args, "fused_backend") not in GRPO_BACKENDS:  # named as the config names it
        raise ValueError(f"fused_backend must be one of {GRPO_BACKENDS}, got {option(args, 'fused_backend')!r}")
    loss_options(args)
    if args.loss_type == "vespo" and args.off_policy_mask_threshold is not None:
        raise ValueError("off_policy_mask_threshold is not supported with loss_type='vespo' by FusedEntropyGRPOTrainer")
    if option(args, "use_repo_r"):
        build_repo(args)
    if option(args, "sampling_replay"):
        if not (getattr(args, "use_vllm", False) and getattr(args, "vllm_importance_sampling_correction", False)):
            raise ValueError("sampling_replay=True needs use_vllm=True and vllm_importance_sampling_correction=True "
                             "(it makes the ratio against vLLM's processed log-probs unbiased)")
        _check_replayable(args)
        if sampling_truncation(args) is None:
            raise ValueError("sampling_replay=True but top_k, top_p and min_p truncate nothing "
                             f"(top_k={args.top_k}, top_p={args.top_p}, min_p={args.min_p})")


def build_controller(args):
    kind = _controller_kind(args)
    if kind is None:
        return None
    if kind == "static":
        return StaticEntropyCoef(args.entropy_coef)
    if kind == "adaptive":
        return AdaptiveEntropyCoef(
            target=args.entropy_target, delta=args.entropy_coef_delta, coef_min=args.entropy_coef_min,
            coef_max=args.entropy_coef_max, init=args.entropy_coef, strict=option(args, "adaptive_entropy_strict"),
            start_enabled=option(args, "adaptive_entropy_start_enabled"),
        )
    return AEntCoef(
        low=option(args, "entropy_low"), high=option(args, "entropy_high"), lr=option(args, "entropy_coef_lr"),
        coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max, init=args.entropy_coef,
        warmup=option(args, "entropy_coef_warmup"), reg=option(args, "entropy_coef_reg"),
    )


def build_repo(args):
    if not option(args, "use_repo_r"):
        return None
    return REPOZeta(init=option(args, "repo_zeta"), zeta_min=option(args, "repo_zeta_min"),
                    zeta_max=option(args, "repo_zeta_max"), target=option(args, "repo_entropy_target"))

