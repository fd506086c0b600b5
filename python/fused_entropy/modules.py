"""nn.Module wrappers over the functional API.

:class:`LinearGRPOLoss` is a drop-in for liger-kernel 0.8.5's ``LigerFusedLinearGRPOLoss`` (same
constructor arguments, same ``forward`` signature, same ``(loss, metrics)`` return layout) that also
computes the policy entropy in the same sweep over the LM head and can add an entropy bonus:

    loss = GRPO-family loss of grpo_loss (MATH.md section 4, Liger's aggregation)
           - entropy_coef * sum(H * M_eff) / max(sum M_eff, 1)            (MATH.md section 5)

with ``H`` the full or the clamped (top-k) entropy of the tokens under the current policy.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from . import _grpo as G
from . import _linear_grpo_inputs as I
from ._linear_grpo_inputs import LigerAssertionError  # noqa: F401 (re-exported)
from ._single_pass import _IGNORE, SINGLE_PASS_ELEMENTS, SinglePass  # noqa: F401 (re-exported)
from .functional import linear_logprobs

# A chunk of whole sequences (sequence-level objectives) is allowed up to this many logits; longer
# sequences take the two-pass path, whose working memory does not grow with the sequence length.
WHOLE_SEQUENCE_MAX_ELEMENTS = 1 << 23
ENTROPY_SOURCES = G.ENTROPY_SOURCES
_check_bool = G._check_bool


class LinearGRPOLoss(nn.Module):
    """Fused LM head + GRPO-family loss + entropy bonus, without ``[N, V]`` logits.

    Liger-compatible arguments (liger-kernel 0.8.5 ``LigerFusedLinearGRPOLoss``, same names, defaults
    and meaning): ``beta, compiled, use_ref_model, chunk_size, epsilon_low, epsilon_high, loss_type,
    max_completion_length, importance_sampling_level, sapo_temperature_pos, sapo_temperature_neg,
    temperature, delta, use_bias_correction_kl, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
    vespo_lambda_neg``. ``compiled`` and ``chunk_size`` are accepted and have no effect on the result
    (nothing here is compiled; chunking is chosen for memory and speed, see ``rows_per_chunk``).

    Extra arguments (keyword only):
        entropy_coef: bonus coefficient ``alpha`` (0: no bonus; the entropy is still reported).
        entropy_source: ``"full"`` (the entropy ``H``) or ``"clamped"`` (the top-k entropy of
            MATH.md section 3, needs ``topk`` or ``clamp_p``) for the bonus and the 80/20 mask.
        topk / clamp_p: size of the clamped set: ``k`` or all but the ``floor(clamp_p * V)`` lowest
            logits (AEnt). Either one also reports the clamped entropy.
        top_entropy_quantile: ``q`` in [0, 1]; below 1 only the tokens at or above the ``(1-q)``
            entropy quantile carry the policy term and the bonus (needs two passes); 0 keeps only the
            highest-entropy token(s), as stock TRL.
        entropy_controller: an object with ``coef`` and ``observe(entropy_sum, token_count)``
            (``fused_entropy.control``); the bonus coefficient is read from it at every call, and in
            training mode with grad enabled every call reports its entropy to it. Not with
            ``entropy_coef``.
        clip_cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_ratio, ppo_kl_coef, generator: Clip-Cov and
            KL-Cov (``loss_type="clip_cov"|"kl_cov"``, verl names and defaults; two passes).
        softcap, logit_scale: logit transform ``softcap(logit_scale * (h.W + b)) / temperature``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        single_pass: None (auto), True (require) or False (always two passes). The single pass forms
            the gradients inside the forward (3 matrix products); it needs a token-level objective
            whose normalizers are known from the masks (no 80/20 mask, no Clip-Cov/KL-Cov) and a
            backend with ``linear_forward_backward`` (both have one: torch, and Triton, where the
            logits of a row chunk stay in its bounded logits buffer). ``last_path`` says which path
            the last call took ("single", "two", or "forward" without gradients). Sequence-level
            objectives (GSPO, vespo) are chunked by whole sequences, up to
            ``WHOLE_SEQUENCE_MAX_ELEMENTS`` logits per chunk.
        process_group: a ``torch.distributed`` group over which the LM head is split by vocabulary
            (tensor parallelism): every rank passes its contiguous shard of ``lin_weight`` (and
            ``bias``, ``ref_weight``, ``ref_bias``) and the same ``_input``, global token ids, masks
            and advantages. Log-probs and (clamped) entropies are the exact global ones
            (``linear_logprobs(process_group=...)``, whose docstring states the collectives), the
            loss takes the two-pass path, ``_input`` gets the full gradient on every rank and each
            weight shard its own. ``topk``/``clamp_p`` refer to the global vocabulary. With
            ``loss_type="luspo"`` (every position computed) each id >= 0 must be a vocabulary id,
            masked positions included.
        dp_group: the data-parallel group (ranks holding different tokens) over which the DAPO token
            count, the 80/20 threshold and global Cov statistics are taken (None: every rank). With
            ``process_group`` pass it explicitly: the world would give the 80/20 threshold each token
            once per tensor-parallel rank.
        cov_statistics: ``"local"`` or ``"global"`` Clip-Cov/KL-Cov statistics (see ``grpo_loss``).
        sampling_top_k, sampling_top_p, sampling_min_p: the truncation the rollouts were sampled with
            (vLLM's ``top_k``/``top_p``/``min_p``; numbers, None: off). The policy's log-probs are then
            those of the truncated, renormalized distribution (``linear_logprobs``'s
            ``truncated_logprobs``, MATH.md section 8), so the ratio against vLLM's
            ``processed_logprobs`` (``old_per_token_logps`` or ``vllm_is_ratio``) carries no ``log S``.
            A target outside the kept set (the sampler kept it, the policy's truncation does not:
            a numerical boundary case) uses its full-vocabulary log-prob; ``last_metrics
            ["sampling/not_kept_frac"]`` reports how many did. Reference log-probs computed from
            ``ref_input`` take the same truncation (given ``ref_per_token_logps`` are used as they
            are). Two-pass path.
        rows_per_chunk: rows per chunk of the single pass (default: the backend's
            ``single_pass_rows`` where it has one, i.e. on Triton the rows the bounded logits buffer
            holds, ``configs.logits_buffer_bytes()``; else about ``SINGLE_PASS_ELEMENTS`` logits per
            chunk, i.e. two 7 MiB fp32 blocks).

    ``forward(_input [B, T, H], lin_weight [V, H], selected_token_ids [B, T], attention_mask [B, T],
    advantages [B] or [B, T], bias [V]=None, ref_per_token_logps [B, T]=None, old_per_token_logps
    [B, T]=None, ref_input [B, T, H']=None, ref_weight [V, H']=None, ref_bias [V]=None, vllm_is_ratio
    [B, T]/[B, 1]/[B]=None, num_items_in_batch=None)`` returns ``(loss, metrics)`` with Liger's layout:
    ``metrics = (kl, clip_ratio)`` when ``beta != 0`` else ``(clip_ratio,)``, each a 0-d tensor
    (``kl`` the masked mean of the k3 KL, ``clip_ratio`` the masked fraction of clipped tokens). Every
    metric of ``grpo_loss`` for the last call (``policy_loss``, ``entropy``, ``clamped_entropy``,
    ``entropy_coef``, ``clip_ratio/*``, ``kl``) is in :attr:`last_metrics`.

    With ``use_ref_model`` and ``beta != 0``, ``ref_per_token_logps`` is used when given, else the
    reference log-probs come from ``ref_input``/``ref_weight``/``ref_bias`` through the same fused path
    under ``no_grad``. Without ``use_ref_model`` the KL is taken to the current policy (0), as in Liger.

    Numeric guarantees and input rules: ``attention_mask`` holds 0/1 only (bool, integer or floating;
    Liger/TRL would weight by other values, here they raise); entries of ``[B, T]`` inputs outside the
    mask may be anything (NaN/inf included). ``selected_token_ids`` of any integer dtype; inside the
    mask they must be vocabulary ids; for ``loss_type="luspo"`` a masked position with an id outside
    ``[0, V)`` (-100 padding) is scored with no target logit (``logp = -lse``), as Liger does (two-pass
    path). ``lin_weight``/``bias`` fp32 with a bf16/fp16 ``_input`` (AMP) run in ``_input``'s dtype;
    a ``DTensor`` head (FSDP2) is gathered. With ``num_items_in_batch`` the entropy bonus of dapo,
    cispo and vespo is divided by the same ``N_items`` as the policy term (window-exact under
    gradient accumulation); other loss types use the micro-batch mean (divide by the accumulation
    steps yourself, as TRL does). Scalars: ``temperature``/``softcap`` in ``[1e-30, 1e30]``, loss
    options ``|x| <= 1e30``. First derivatives only.

    Bad configurations fail where Liger 0.8.5's fail, with its exception type and words: ``delta`` or a
    sapo temperature <= 0 in the constructor (``ValueError``); an unknown ``loss_type`` or
    ``importance_sampling_level``, sequence level with cispo/sapo/vespo (``ValueError``), dr_grpo
    without ``max_completion_length`` and ``use_ref_model`` (with ``beta != 0``) without reference
    inputs (:class:`LigerAssertionError`, an ``AssertionError`` and a ``ValueError``) in ``forward``.
    Values Liger accepts but cannot compute with (NaN, a temperature of 0, ``max_completion_length=0``
    for dr_grpo) and this package's own options fail in the constructor.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        entropy_coef: float = 0.0,
        entropy_source: str = "full",
        topk: Optional[int] = None,
        clamp_p: Optional[float] = None,
        top_entropy_quantile: float = 1.0,
        entropy_controller: Any = None,
        clip_cov_ratio: float = 2e-4,
        clip_cov_lb: float = 1.0,
        clip_cov_ub: float = 5.0,
        kl_cov_ratio: float = 2e-4,
        ppo_kl_coef: float = 1.0,
        generator: Optional[torch.Generator] = None,
        softcap: Optional[float] = None,
        logit_scale: float = 1.0,
        backend: str = "auto",
        single_pass: Optional[bool] = None,
        rows_per_chunk: Optional[int] = None,
        process_group=None,
        dp_group=None,
        cov_statistics: str = "local",
        sampling_top_k: Optional[int] = None,
        sampling_top_p: Optional[float] = None,
        sampling_min_p: Optional[float] = None,
    ):
        super().__init__()
        # Everything knowable without tensors is checked here, with the argument's name, except what
        # Liger 0.8.5 accepts here and rejects in forward (I.liger_config_error)
        I.check_arguments(
            loss_type=loss_type, importance_sampling_level=importance_sampling_level, delta=delta,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            vespo_lambda_pos=vespo_lambda_pos, vespo_lambda_neg=vespo_lambda_neg, use_ref_model=use_ref_model,
            temperature=temperature, softcap=softcap, logit_scale=logit_scale, entropy_source=entropy_source, topk=topk,
            clamp_p=clamp_p, entropy_controller=entropy_controller, entropy_coef=entropy_coef, generator=generator,
            backend=backend, single_pass=single_pass, rows_per_chunk=rows_per_chunk, sampling_top_k=sampling_top_k,
            sampling_top_p=sampling_top_p, sampling_min_p=sampling_min_p, process_group=process_group,
        )
        sampling = not (sampling_top_k is None and sampling_top_p is None and sampling_min_p is None)

        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.entropy_coef = entropy_coef
        self.entropy_source = entropy_source
        self.topk = topk
        self.clamp_p = clamp_p
        self.top_entropy_quantile = top_entropy_quantile
        self.entropy_controller = entropy_controller
        self.clip_cov_ratio = clip_cov_ratio
        self.clip_cov_lb = clip_cov_lb
        self.clip_cov_ub = clip_cov_ub
        self.kl_cov_ratio = kl_cov_ratio
        self.ppo_kl_coef = ppo_kl_coef
        self.generator = generator
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.backend = backend
        self.single_pass = single_pass
        self.rows_per_chunk = rows_per_chunk
        self.process_group = process_group
        self.dp_group = dp_group
        self.cov_statistics = cov_statistics
        self.sampling_top_k = sampling_top_k
        self.sampling_top_p = sampling_top_p
        self.sampling_min_p = sampling_min_p
        self.last_metrics: Dict[str, torch.Tensor] = {}
        self.last_path: Optional[str] = None
        self._options(constructing=True)  # every loss option, checked once here (GRPOOptions)
        why = self._two_pass_reason(loss_type, top_entropy_quantile, sampling)
        if single_pass and why is not None:
            raise ValueError(f"single_pass=True is not possible: {why}")

    # -----------------------------------------------------------------------------------------
    # options
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _two_pass_reason(loss_type: str, top_entropy_quantile: float, sampling: bool = False) -> Optional[str]:
        if sampling:
            return "the sampling truncation replay (sampling_top_k/top_p/min_p) runs in the two-pass path"
        if top_entropy_quantile < 1.0:
            return "top_entropy_quantile < 1 needs the entropy quantile of the whole batch first"
        if loss_type in G.LOSSES and G.LOSSES[loss_type].whole_batch:
            return f"loss_type={loss_type!r} selects tokens from statistics of the whole micro-batch"
        return None

    def _options(self, *, constructing: bool = False) -> G.GRPOOptions:
        """The loss options of the current attributes, checked (``GRPOOptions``). In the constructor,
        what Liger 0.8.5 rejects only in forward (``_liger_config_error``) stands in as a neutral value,
        so that every other option is checked there and those in forward, with Liger's words."""
        loss_type, level = self.loss_type, self.importance_sampling_level
        if constructing and self._liger_config_error() is not None:
            loss_type = loss_type if loss_type in G.LOSSES and loss_type != "dr_grpo" else "dapo"
            level = "token"
        return G.GRPOOptions(
            loss_type=loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.delta,
            beta=self.beta, use_bias_correction_kl=self.use_bias_correction_kl, importance_sampling_level=level,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            # below VESPO_LAMBDA_MIN a lambda acts as VESPO_LAMBDA_MIN (TRL/Liger clamp; grpo_loss wants > 0)
            vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=max(self.vespo_lambda_pos, G.VESPO_LAMBDA_MIN),
            vespo_k_neg=self.vespo_k_neg, vespo_lambda_neg=max(self.vespo_lambda_neg, G.VESPO_LAMBDA_MIN),
            # only dr_grpo reads it; Liger ignores it (whatever it holds) for the other loss types
            max_completion_length=self.max_completion_length if loss_type == "dr_grpo" else None,
            entropy_coef=self.entropy_coef, top_entropy_quantile=self.top_entropy_quantile,
            entropy_source=self.entropy_source, luspo_normalization="liger", clip_cov_ratio=self.clip_cov_ratio,
            clip_cov_lb=self.clip_cov_lb, clip_cov_ub=self.clip_cov_ub, kl_cov_ratio=self.kl_cov_ratio,
            ppo_kl_coef=self.ppo_kl_coef, backend=self.backend, cov_statistics=self.cov_statistics,
        )

    def _check_liger_config(self) -> None:
        error = self._liger_config_error()
        if error is not None:
            raise error

    def _liger_config_error(self) -> Optional[Exception]:
        return I.liger_config_error(self.loss_type, self.importance_sampling_level, self.max_completion_length)

    def _sampling_kwargs(self) -> Optional[Dict[str, Any]]:
        kw = dict(sampling_top_k=self.sampling_top_k, sampling_top_p=self.sampling_top_p,
                  sampling_min_p=self.sampling_min_p)
        return None if all(v is None for v in kw.values()) else kw

    def _coef(self) -> float:
        ctrl = self.entropy_controller
        if ctrl is None:
            return float(self.entropy_coef)
        coef = ctrl.coef
        if isinstance(coef, torch.Tensor) and coef.numel() == 1 and not (coef.dtype.is_complex or coef.dtype == torch.bool):
            coef = float(coef)
        G._check_number("entropy_controller.coef", coef)
        return float(coef)

    # -----------------------------------------------------------------------------------------
    # forward
    # -----------------------------------------------------------------------------------------

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        self._check_liger_config()
        options = self._options()  # checked once per call; the chunks of the single pass reuse it
        group = self.process_group
        b = I.check_batch(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_per_token_logps,
            old_per_token_logps, vllm_is_ratio, ref_weight, ref_bias, every_position=options.row.aggregation == "luspo",
            temperature=self.temperature, softcap=self.softcap, logit_scale=self.logit_scale, topk=self.topk,
            clamp_p=self.clamp_p, backend=self.backend, process_group=group,
        )
        ref = None  # without use_ref_model (or with beta == 0) the KL is to the policy itself
        if self.use_ref_model and self.beta != 0.0:
            ref = I.reference_logprobs(ref_per_token_logps, ref_input, b, backend=self.backend, process_group=group,
                                       sampling=self._sampling_kwargs())
        observe = self.training and torch.is_grad_enabled() and self.entropy_controller is not None
        coef = self._coef()
        # Without a gradient to compute, the forward of the two-pass path is all there is to do.
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (b.x, b.w, b.bias))
        # The vocabulary-parallel head takes the two-pass path: every rank's statistics come before any gradient.
        whole_sequences = G.whole_sequences(options.loss_type, options.importance_sampling_level)
        use_single = group is None and self._single_pass_possible(b, whole_sequences) and needs_grad
        # Under torch.compile the auto choice is the two-pass path: it is custom ops plus torch (one graph);
        # the single pass takes gradients inside forward over data-dependent row chunks (graph breaks).
        use_single = use_single and not (self.single_pass is None and torch.compiler.is_compiling())

        common = dict(options=options, advantages=advantages, mask=attention_mask, old=old_per_token_logps, ref=ref,
                      is_ratio=vllm_is_ratio, num_items_in_batch=num_items_in_batch, coef=coef, observe=observe)
        if use_single:
            loss, metrics = self._single_pass(b, whole_sequences, **common)
            self.last_path = "single"
        else:
            loss, metrics = self._two_pass(b, **common)
            self.last_path = "two" if needs_grad else "forward"
        self.last_metrics = metrics
        out = []
        if self.beta != 0.0:
            out.append(metrics["kl"])
        out.append(metrics["clip_ratio/region_mean"])
        return loss, tuple(out)

    def _single_pass_possible(self, b: I.Batch, whole_sequences: bool) -> bool:
        """Whether the single pass can take this call (raises with the reason where ``single_pass=True``)."""
        why = self._two_pass_reason(self.loss_type, self.top_entropy_quantile, self._sampling_kwargs() is not None)
        if why is None and not hasattr(b.be, "linear_forward_backward"):
            why = f"backend {b.be.__name__.rsplit('.', 1)[-1]} has no single-pass linear_forward_backward"
        if why is None and whole_sequences and b.seqlen * b.vocab > WHOLE_SEQUENCE_MAX_ELEMENTS:
            why = f"a whole sequence of T={b.seqlen} tokens is more than {WHOLE_SEQUENCE_MAX_ELEMENTS} logits"
        if why is None and b.no_target is not None:
            why = "loss_type='luspo' with masked ids outside [0, V) (scored with no target logit, as Liger does)"
        if self.single_pass and why is not None:
            raise ValueError(f"single_pass=True is not possible: {why}")
        return why is None and self.single_pass is not False

    # -----------------------------------------------------------------------------------------
    # two passes: linear_logprobs (autograd) -> grpo_loss -> backward recomputes the logits
    # -----------------------------------------------------------------------------------------

    def _two_pass(self, b: I.Batch, *, options, advantages, mask, old, ref, is_ratio, num_items_in_batch, coef,
                  observe):
        tf = b.tf
        stats = linear_logprobs(
            b.x, b.w, b.targets, bias=b.bias, temperature=tf.temperature, softcap=tf.softcap, logit_scale=tf.logit_scale,
            ignore_index=_IGNORE, entropy=True, topk=self.topk, clamp_p=self.clamp_p, backend=self.backend,
            process_group=self.process_group, **(self._sampling_kwargs() or {}),
        )
        logp = stats.policy_logprobs()  # the truncated log-probs under a sampling replay
        if b.no_target is not None:
            logp = logp - I.no_target_logit(b.x, b.w, b.bias, b.no_target, tf, logp.dtype)
        if self.beta != 0.0 and ref is None:
            ref = logp.detach()
        inputs = G.GRPOInputs(logp, advantages, mask, old, ref, stats.entropy, stats.clamped_entropy, is_ratio)
        inputs.check()
        if not observe:
            options = options.replace(entropy_coef=coef)
        call = G.check_call(options, inputs, num_items_in_batch=num_items_in_batch,
                            entropy_controller=self.entropy_controller if observe else None, generator=self.generator,
                            dp_group=self.dp_group)
        loss, metrics = G.compute(options, call, inputs, observe=torch.is_grad_enabled())
        if stats.truncated_logprobs is not None:
            valid = mask.bool()
            not_kept = torch.isinf(stats.truncated_logprobs) & valid
            metrics["sampling/not_kept_frac"] = not_kept.sum().to(logp.dtype) / valid.sum().clamp(min=1)
        return loss, metrics

    # -----------------------------------------------------------------------------------------
    # single pass: per chunk of rows, logits -> statistics -> d loss/d (logp, H, H~) -> dX, dW, db
    # -----------------------------------------------------------------------------------------

    def _single_pass(self, b: I.Batch, whole_sequences, *, options, advantages, mask, old, ref, is_ratio,
                     num_items_in_batch, coef, observe):
        sweep = SinglePass(
            b.x, b.w, b.bias, b.targets, options=options,
            inputs=G.GRPOInputs(None, advantages, mask, old, ref, None, None, is_ratio),
            num_items_in_batch=num_items_in_batch, coef=coef, controller=self.entropy_controller if observe else None,
            generator=self.generator, dp_group=self.dp_group, k=b.k, tf=b.tf, be=b.be, whole_sequences=whole_sequences,
            rows_per_chunk=self.rows_per_chunk,
        )
        loss = sweep()
        return loss, sweep.metrics
