"""``FusedEntropyGRPOTrainer`` (TRL's ``GRPOTrainer`` with the fused head and loss) and the
``ControllerStateCallback`` that carries its controller state in ``trainer_state.json``."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..._grpo.losses import LOSSES, TOKEN_NORMALIZED
from ..._types import TokenStats
from ...backends import get_backend
from ...control import AdaptiveEntropyCoef, StaticEntropyCoef, repo_r_advantages
from ...functional import grpo_loss
from .config import FusedEntropyGRPOConfig, build_controller, build_repo, option, sampling_truncation, validate_options
from .head import HeadRequest, install_fused_head, kernel_function

STATE_FILE = "fused_entropy_state.json"
TRL_STATE_FILE = "entropy_ctrl_state.json"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME (its module moved between releases)


class ControllerStateCallback(TrainerCallback, ExportableState):
    """Carries a :class:`FusedEntropyGRPOTrainer`'s controller state in ``trainer_state.json``.

    ``state()`` is ``{"args": {}, "attributes": {"entropy_controller": <state_dict or None>,
    "repo_zeta": <state_dict or None>}}``, read from the bound trainer's controllers when
    transformers saves a checkpoint. transformers may rebuild the callback from that dict on resume
    (``restore_callback_states_from_checkpoint``: ``type(cb)(**args)``, then the attributes set), so
    it takes no constructor arguments and keeps the attributes it was given until the trainer binds it.
    """

    def __init__(self):
        self.trainer: Optional["FusedEntropyGRPOTrainer"] = None
        self.entropy_controller: Optional[dict] = None
        self.repo_zeta: Optional[dict] = None

    def state(self) -> dict:
        if self.trainer is not None:
            attributes = self.trainer.controller_state()
        else:
            attributes = {"entropy_controller": self.entropy_controller, "repo_zeta": self.repo_zeta}
        return {"args": {}, "attributes": attributes}


class FusedEntropyGRPOTrainer(GRPOTrainer):
    """TRL ``GRPOTrainer`` computing log-probs, entropies and the loss with fused-entropy.

    Takes the same arguments as ``GRPOTrainer``; ``args`` is a :class:`FusedEntropyGRPOConfig` (a plain
    ``GRPOConfig`` works too and gets the added options' defaults). Unsupported combinations raise
    ``ValueError`` here, at construction: vision-language models, MoE router auxiliary loss,
    DeepSpeed ZeRO-3, ``vespo`` with ``off_policy_mask_threshold``. ``top_entropy_quantile=0`` keeps only
    the highest-entropy token, as stock TRL.

    Metrics are TRL's (``entropy``, ``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``,
    ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` when a bonus controller is active)
    plus ``clamped_entropy`` (when computed), ``entropy_coef_applied`` (the coefficient used in the
    step), ``entropy_ctrl/window_entropy`` (the window mean that drove the update), ``cov/selected_mean``
    (Clip-Cov/KL-Cov) and ``repo/zeta``.

    TRL's entropy attributes (``entropy_coef``, ``use_adaptive_entropy``, ``_last_world_entropy``,
    ``_entropy_bonus_enabled``, ``top_entropy_quantile``) hold what stock ``GRPOTrainer`` holds after
    every step: they are views of the controller (``use_adaptive_entropy``: TRL's adaptive rule runs),
    and assigning ``entropy_coef`` or ``_last_world_entropy`` sets the controller's state.
    """

    def __init__(self, model, reward_funcs=None, args: Optional[GRPOConfig] = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = FusedEntropyGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a FusedEntropyGRPOConfig (or GRPOConfig), got {type(args).__name__}")
        validate_options(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)

        if self._is_vlm:
            raise ValueError("vision-language models (a ProcessorMixin processing_class) are not supported by "
                             "FusedEntropyGRPOTrainer; use trl.GRPOTrainer")
        if self.aux_loss_enabled:
            raise ValueError("the MoE router auxiliary loss (router_aux_loss_coef != 0) is not supported by "
                             "FusedEntropyGRPOTrainer; set router_aux_loss_coef=0.0")
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("DeepSpeed ZeRO-3 is not supported by FusedEntropyGRPOTrainer: the fused head reads "
                             "lm_head.weight again in backward, after ZeRO-3 has re-partitioned it")

        self._entropy_ctrl = build_controller(args)
        # TRL's gate of its bonus code (constant for the run); here: a controller runs
        self._entropy_bonus_enabled = self._entropy_ctrl is not None
        self._repo = build_repo(args)
        self._entropy_source = option(args, "entropy_source")
        self._topk, self._clamp_p = option(args, "topk"), option(args, "clamp_p")
        self._want_clamped = self._topk is not None or self._clamp_p is not None
        self._sampling = sampling_truncation(args) if option(args, "sampling_replay") else None
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        vocab = policy.get_output_embeddings().weight.shape[0]
        if self._topk is not None and self._topk > vocab:
            raise ValueError(f"topk must be in [1, V={vocab}], got {self._topk}")
        backend = option(args, "fused_backend")
        get_backend(backend, self.accelerator.device)  # e.g. 'triton' without CUDA: fail now, not in step 1
        head = dict(temperature=self.temperature, topk=self._topk, clamp_p=self._clamp_p, backend=backend)
        if option(args, "fused_kernel") is not None:
            head["linear_logprobs"] = kernel_function(option(args, "fused_kernel"))
        install_fused_head(policy, **head)
        if self.ref_model is not None:
            install_fused_head(self.accelerator.unwrap_model(self.ref_model), **head)
        self.add_callback(ControllerStateCallback)
        self._state_callback()

    # --- TRL's public entropy attributes, read from and written to the controller -------------
    # Stock GRPOTrainer keeps its adaptive-entropy state in entropy_coef, use_adaptive_entropy and
    # _last_world_entropy (its checkpoint code reads and writes them, callbacks read them). Here the
    # controller holds that state, so these are views of it: they read what stock TRL holds after
    # every step, and assigning one (TRL's resume code does) updates the controller. Until the
    # controller exists (GRPOTrainer.__init__ assigns them first) they are plain values.

    def _built(self) -> bool:
        return "_entropy_ctrl" in self.__dict__

    @property
    def entropy_coef(self) -> float:
        """TRL's ``entropy_coef``: the controller's current (ungated) coefficient."""
        ctrl = self.__dict__.get("_entropy_ctrl")
        if ctrl is None:
            return self.__dict__["_trl_entropy_coef"] if "_trl_entropy_coef" in self.__dict__ else self.args.entropy_coef
        return float(ctrl.value)

    @entropy_coef.setter
    def entropy_coef(self, value) -> None:
        ctrl = self.__dict__.get("_entropy_ctrl")
        if ctrl is None:  # not built yet, or no bonus (then, as in TRL, the value is never applied)
            self.__dict__["_trl_entropy_coef"] = value
        elif isinstance(ctrl, StaticEntropyCoef):
            new = StaticEntropyCoef(value)
            new.load_state_dict(ctrl.state_dict())  # keeps the open window and the last entropy
            self._entropy_ctrl = new
        else:
            sd = ctrl.state_dict()
            sd["value"] = value
            ctrl.load_state_dict(sd)  # checks the number

    @property
    def use_adaptive_entropy(self) -> bool:
        """TRL's ``use_adaptive_entropy``: whether TRL's adaptive rule (``AdaptiveEntropyCoef``) runs."""
        if not self._built():
            if "_trl_use_adaptive_entropy" in self.__dict__:
                return self.__dict__["_trl_use_adaptive_entropy"]
            return self.args.use_adaptive_entropy
        return isinstance(self._entropy_ctrl, AdaptiveEntropyCoef)

    @use_adaptive_entropy.setter
    def use_adaptive_entropy(self, value) -> None:
        if self._built() and bool(value) != self.use_adaptive_entropy:
            raise AttributeError("use_adaptive_entropy is fixed by the config once FusedEntropyGRPOTrainer is built "
                                 "(use_adaptive_entropy / entropy_controller)")
        self.__dict__["_trl_use_adaptive_entropy"] = value

    @property
    def _last_world_entropy(self) -> float:
        """TRL's gate state: the last window's entropy, +inf before the first window (bonus off)."""
        ctrl = self.__dict__.get("_entropy_ctrl")
        if not isinstance(ctrl, AdaptiveEntropyCoef):
            return self.__dict__.get("_trl_last_world_entropy", math.inf)
        if ctrl.last_entropy is not None:
            return float(ctrl.last_entropy)
        return ctrl.target if ctrl.enabled else math.inf  # start_enabled: an open gate, in TRL's terms

    @_last_world_entropy.setter
    def _last_world_entropy(self, value) -> None:
        ctrl = self.__dict__.get("_entropy_ctrl")
        if not isinstance(ctrl, AdaptiveEntropyCoef):
            self.__dict__["_trl_last_world_entropy"] = value
            return
        last = float(value)
        sd = ctrl.state_dict()
        sd["enabled"] = (last < ctrl.target) if ctrl.strict else (last <= ctrl.target)
        sd["last_entropy"] = last if math.isfinite(last) else None
        ctrl.load_state_dict(sd)

    # --- log-probs and entropies ------------------------------------------------------------
    def _fused_token_stats(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                           entropy=False, clamped=False) -> TokenStats:
        batch_size = batch_size or input_ids.size(0)
        request = HeadRequest(int(logits_to_keep), bool(entropy), bool(clamped), getattr(self, "_sampling", None))
        parts = []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            with self.accelerator.autocast():
                parts.append(model(input_ids=input_ids[start:end], attention_mask=attention_mask[start:end],
                                   fused_entropy=request))
        return TokenStats(*(None if xs[0] is None else torch.cat(xs, 0) for xs in zip(*parts)))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's hook for old/reference log-probs, computed by the fused head. Returns ``(logps, entropies, None)``."""
        extra = sorted(k for k, v in multimodal.items() if v is not None)
        if extra or compute_aux_loss:
            raise ValueError(f"FusedEntropyGRPOTrainer got inputs it does not support: {extra or ['compute_aux_loss']}")
        stats = self._fused_token_stats(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                        entropy=compute_entropy)
        return stats.logprobs, stats.entropy, None

    # --- the loss -----------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        stats = self._fused_token_stats(
            model, input_ids, attention_mask, logits_to_keep, entropy=True, clamped=self._want_clamped
        )
        logps, entropies, clamped = stats.logprobs, stats.entropy, stats.clamped_entropy
        advantages = inputs["advantages"]
        adv_2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old = inputs.get("old_per_token_logps")
        old_or_current = logps.detach() if old is None else old

        # vLLM importance ratio and TRL's off-policy sequence mask both multiply the per-token policy
        # loss (not the KL term): grpo_loss's is_ratio is that factor.
        is_ratio = None
        if self.loss_type == "vespo":
            # VESPO folds the ratio into its sequence weight instead; TRL reads it whenever present.
            is_ratio = inputs.get("importance_sampling_ratio")
        elif self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages=adv_2d, per_token_logps=logps, sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_or_current),
                mask=mask, off_policy_threshold=self.off_policy_mask_threshold,
            ).to(logps.dtype)
            is_ratio = keep if is_ratio is None else is_ratio * keep

        loss_adv = advantages
        if self._repo is not None:
            loss_adv = repo_r_advantages(advantages, old_or_current, self._repo.zeta)

        num_items = None
        if self.loss_type in TOKEN_NORMALIZED:
            # TRL divides by num_items / world * GA / steps_per_generation and then not by GA; dividing
            # grpo_loss's micro-batch loss by GA below needs num_items / steps_per_generation here.
            num_items = inputs["num_items_in_batch"]
            if mode == "train":
                num_items = num_items / self.args.steps_per_generation
        ctrl = self._entropy_ctrl
        applied_coef = None if ctrl is None else float(ctrl.coef)
        generator = None
        if self.loss_type == "clip_cov":
            generator = torch.Generator(device=logps.device)
            generator.manual_seed(hash((self.args.seed, self.accelerator.process_index, self._step)) % (1 << 62))

        loss, m = grpo_loss(
            logps, loss_adv, mask,
            old_logprobs=old, ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            entropy=entropies, clamped_entropy=clamped, entropy_source=self._entropy_source,
            loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.args.delta, beta=self.beta, use_bias_correction_kl=bool(self.args.use_bias_correction_kl),
            importance_sampling_level=self.importance_sampling_level,
            sapo_temperature_pos=self.args.sapo_temperature_pos, sapo_temperature_neg=self.args.sapo_temperature_neg,
            vespo_k_pos=self.args.vespo_k_pos, vespo_lambda_pos=self.args.vespo_lambda_pos,
            vespo_k_neg=self.args.vespo_k_neg, vespo_lambda_neg=self.args.vespo_lambda_neg,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items, is_ratio=is_ratio,
            entropy_controller=ctrl if mode == "train" else None,
            entropy_coef=applied_coef if (ctrl is not None and mode != "train") else 0.0,
            top_entropy_quantile=self.top_entropy_quantile, luspo_normalization="trl",
            clip_cov_ratio=option(self.args, "clip_cov_ratio"), clip_cov_lb=option(self.args, "clip_cov_lb"),
            clip_cov_ub=option(self.args, "clip_cov_ub"), kl_cov_ratio=option(self.args, "kl_cov_ratio"),
            ppo_kl_coef=option(self.args, "ppo_kl_coef"), generator=generator, backend=option(self.args, "fused_backend"),
            # TRL 1.16: the bonus is the micro-batch mean entropy for every loss type, divided by the
            # accumulation steps below (not the window-exact N_items rule grpo_loss uses by default)
            bonus_normalization="mean",
        )
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss / ga

        if ctrl is not None:
            policy_loss = m["policy_loss"]
            if self.loss_type in TOKEN_NORMALIZED:
                policy_loss = policy_loss / ga  # TRL reports the window-normalized value for these types
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            self._metrics[mode]["entropy_coef_applied"].append(applied_coef)
        if mode == "train" and self._repo is not None:
            self._repo.observe((entropies.detach() * mask).sum(), mask.sum())
        if mode == "train" and self.accelerator.sync_gradients:
            if ctrl is not None:
                window = ctrl.step()
                self._metrics[mode]["entropy_coef"].append(float(ctrl.value))
                if window is not None:
                    self._metrics[mode]["entropy_ctrl/window_entropy"].append(window)
            if self._repo is not None:
                self._repo.step()
                self._metrics[mode]["repo/zeta"].append(float(self._repo.zeta))

        self._log_trl_metrics(mode, logps, old_or_current, entropies, clamped, mask, adv_2d, inputs, m)
        return loss

    def _log_trl_metrics(self, mode, logps, old, entropies, clamped, mask, advantages, inputs, m):
        """TRL 1.16's metrics, with its definitions (global masked means over ranks)."""
        mask = mask.to(logps.dtype)

        def global_masked_mean(x):
            if x.shape[1] == 1:  # sequence level: one value per sequence
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device, dtype=x.dtype)])
            else:
                local = torch.stack([(x * mask).sum(), mask.sum()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

        with torch.no_grad():
            log_ratio = logps.detach() - old
            if self.importance_sampling_level == "sequence":
                log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
            else:
                log_w = log_ratio
            coef_1 = torch.exp(log_w)
            if self.beta != 0.0:
                ref = inputs["ref_per_token_logps"]
                kl = torch.exp(ref - logps.detach()) - (ref - logps.detach()) - 1
                if self.args.use_bias_correction_kl:
                    kl = kl * coef_1
                self._metrics[mode]["kl"].append(global_masked_mean(kl))
            self._metrics[mode]["entropy"].append(global_masked_mean(entropies.detach()))
            if clamped is not None:
                self._metrics[mode]["clamped_entropy"].append(global_masked_mean(clamped.detach()))
            row = LOSSES[self.loss_type]
            if row.family == "clipped":  # the PPO surrogate (clip_cov too): TRL's low/high clip metrics
                if self.args.delta is not None and row.delta:
                    coef_1 = coef_1.clamp(max=self.args.delta)  # TRL measures the clip after the delta clamp
                low = ((coef_1 < 1 - self.epsilon_low) & (advantages < 0)).to(mask.dtype)
                high = ((coef_1 > 1 + self.epsilon_high) & (advantages > 0)).to(mask.dtype)
                self._metrics[mode]["clip_ratio/low_mean"].append(global_masked_mean(low))
                self._metrics[mode]["clip_ratio/high_mean"].append(global_masked_mean(high))
                self._metrics[mode]["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
                self._metrics[mode]["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
                self._metrics[mode]["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())
            elif self.loss_type == "cispo":
                clipped = ((coef_1 > self.epsilon_high) & (advantages > 0)).to(mask.dtype)
                self._metrics[mode]["cispo_clip_ratio"].append(global_masked_mean(clipped))
            elif self.loss_type == "vespo":
                phi = self.get_gamma_weights(
                    advantages=advantages, log_ratio_per_token=log_ratio, mask=mask,
                    importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
                    k_pos=self.args.vespo_k_pos, lambda_pos=self.args.vespo_lambda_pos,
                    k_neg=self.args.vespo_k_neg, lambda_neg=self.args.vespo_lambda_neg,
                )
                self._metrics[mode]["vespo/phi_seq_mean"].append(global_masked_mean(phi))
            if "cov/selected_mean" in m:
                self._metrics[mode]["cov/selected_mean"].append(float(m["cov/selected_mean"]))

    # --- checkpoints --------------------------------------------------------------------------
    def controller_state(self) -> dict:
        """JSON-serializable state of the entropy controller and the REPO zeta controller."""
        return {
            "entropy_controller": None if self._entropy_ctrl is None else self._entropy_ctrl.state_dict(),
            "repo_zeta": None if self._repo is None else self._repo.state_dict(),
        }

    def _state_callback(self) -> ControllerStateCallback:
        """The ``ControllerStateCallback`` in use, bound to this trainer (transformers replaces the
        instance on resume when ``restore_callback_states_from_checkpoint`` is set)."""
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ControllerStateCallback)]
        if not found:
            self.add_callback(ControllerStateCallback)
            found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ControllerStateCallback)]
        for cb in found:
            cb.trainer = self
        return found[0]

    def _save_checkpoint(self, model, trial):
        # Trainer updates stateful_callbacks by name and fails on a missing one, as after resuming a
        # checkpoint whose trainer_state.json predates this callback: give it the entry first.
        cb = self._state_callback()
        self.state.stateful_callbacks.setdefault(type(cb).__name__, cb.state())
        super()._save_checkpoint(model, trial)  # trainer_state.json, with cb.state()
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # the side files, for releases that cannot read trainer_state.json's entry (see the module docstring)
        with open(os.path.join(out, STATE_FILE), "w") as f:
            json.dump(self.controller_state(), f)
        if isinstance(self._entropy_ctrl, AdaptiveEntropyCoef):
            # GRPOTrainer wrote it already; kept here should TRL stop
            with open(os.path.join(out, TRL_STATE_FILE), "w") as f:
                json.dump({"entropy_coef": self.entropy_coef, "last_world_entropy": self._last_world_entropy}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # GRPOTrainer reads TRL's entropy_ctrl_state.json here (through the entropy attributes' setters);
        # the state read below, when there is one, is complete and replaces it
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._restore_controller_state(checkpoint)

    def _saved_controller_state(self, checkpoint) -> Optional[dict]:
        """The controller state saved in ``checkpoint``: trainer_state.json's entry, else the side
        file of earlier releases, else None (a stock GRPOTrainer checkpoint)."""
        from transformers.trainer_callback import TrainerState

        path = os.path.join(checkpoint, TRAINER_STATE_FILE)
        if os.path.isfile(path):
            saved = TrainerState.load_from_json(path).stateful_callbacks.get(ControllerStateCallback.__name__)
            if isinstance(saved, list):  # Trainer's layout for several callbacks of one class
                saved = saved[0]
            if saved is not None:
                return saved["attributes"]
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return None

    def _restore_controller_state(self, checkpoint) -> None:
        cb = self._state_callback()
        state = self._saved_controller_state(checkpoint)
        if state is not None:
            for obj, key in ((self._entropy_ctrl, "entropy_controller"), (self._repo, "repo_zeta")):
                if obj is not None and state.get(key) is not None:
                    obj.load_state_dict(state[key])
        # a trainer_state.json without the entry (an older checkpoint) gets one at the next save
        self.state.stateful_callbacks[type(cb).__name__] = cb.state()

