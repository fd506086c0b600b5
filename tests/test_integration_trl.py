"""integrations.trl: FusedEntropyGRPOTrainer against stock TRL 1.16 GRPOTrainer, on CPU, nothing downloaded.

A 2-layer Qwen2 (V=64, H=32), a WordLevel tokenizer and a prompt dataset are built in code
(tests/_tiny_model.py). Two kinds of tests:

- loss-path parity on a fixed synthetic batch: both trainers' ``_compute_loss`` on the same inputs
  (off-policy old log-probs so clipping is exercised), loss, every parameter gradient and every TRL
  metric compared, over loss types, sequence-level IS, delta, beta/bias-corrected KL, vLLM IS ratios,
  the off-policy mask, the 80/20 mask and TRL's own static/adaptive entropy bonus;
- real ``train()`` runs: first-step parity with stock TRL, controllers' logged coefficients against
  their rules, resume from a checkpoint, no ``[B, T, V]`` tensor in the loss path, bad options.
"""
import json
import math
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from _tiny_model import VOCAB, make_dataset, make_model, make_tokenizer, reward_count_a  # noqa: E402
from fused_entropy import grpo_loss  # noqa: E402
from fused_entropy.control import repo_r_advantages  # noqa: E402
from fused_entropy.integrations.trl import FusedEntropyGRPOConfig, FusedEntropyGRPOTrainer  # noqa: E402

V = len(VOCAB)
BASE = dict(
    per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-3, bf16=False,
    gradient_checkpointing=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", seed=0,
    disable_tqdm=True,
)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """The tiny model saved once, so a trainer can load it (and a reference copy for beta != 0)."""
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    make_model(seed=0).save_pretrained(path)
    return path


def _trainers(model_path, tokenizer, out, **opts):
    """Stock GRPOTrainer and FusedEntropyGRPOTrainer built from the same weights and options."""
    common = dict(BASE, output_dir=out, **opts)
    stock = GRPOTrainer(model_path, reward_count_a, GRPOConfig(**common), train_dataset=make_dataset(),
                        processing_class=tokenizer)
    fused = FusedEntropyGRPOTrainer(model_path, reward_count_a, FusedEntropyGRPOConfig(**common),
                                    train_dataset=make_dataset(), processing_class=tokenizer)
    return stock, fused


def _synthetic_batch(trainer, seed=0, ga=2):
    """A fixed batch with left-padded prompts, right-padded completions and off-policy old log-probs."""
    g = torch.Generator().manual_seed(seed)
    b, p, t = 4, 3, 6
    prompt_ids = torch.randint(4, V, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[1, 0] = 0
    prompt_ids[1, 0] = 0
    completion_ids = torch.randint(4, V, (b, t), generator=g)
    completion_mask = torch.ones(b, t, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), t,
        )
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(b, generator=g),
        "old_per_token_logps": logps + 0.4 * torch.randn(b, t, generator=g),
        "ref_per_token_logps": logps + 0.3 * torch.randn(b, t, generator=g),
        "sampling_per_token_logps": logps + 0.5 * torch.randn(b, t, generator=g),
        "importance_sampling_ratio": torch.exp(0.2 * torch.randn(b, t, generator=g)),
        "num_items_in_batch": completion_mask.sum() * ga,
    }


def _loss_and_grads(trainer, inputs, ga=2, calls=1):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = ga
    losses, grads = [], []
    for _ in range(calls):
        trainer.model.zero_grad()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    return losses, grads


PARITY = {
    "dapo": {},
    "grpo-seq": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "bnpo-delta": dict(loss_type="bnpo", delta=1.2, epsilon=0.1),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.1),
    "sapo": dict(loss_type="sapo"),
    "luspo-seq": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "dapo-beta-biascorr": dict(beta=0.04),
    "grpo-beta": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    "dapo-offpolicy": dict(off_policy_mask_threshold=0.05),
    "dapo-vllm-is": dict(_vllm=True),
    "vespo-vllm-is": dict(loss_type="vespo", _vllm=True),
    "dapo-8020-static-bonus": dict(top_entropy_quantile=0.5, entropy_coef=0.05),
    "grpo-adaptive": dict(loss_type="grpo", use_adaptive_entropy=True, entropy_target=5.0, entropy_coef_delta=0.01),
    "bnpo-adaptive-above-target": dict(loss_type="bnpo", use_adaptive_entropy=True, entropy_coef=0.02,
                                       entropy_target=1.0, entropy_coef_delta=0.01),
}


@pytest.mark.parametrize("case", list(PARITY), ids=list(PARITY))
def test_loss_path_matches_stock_trl(case, model_path, tokenizer, tmp_path):
    opts = dict(PARITY[case])
    vllm = opts.pop("_vllm", False)
    opts.setdefault("gradient_accumulation_steps", 2)
    stock, fused = _trainers(model_path, tokenizer, str(tmp_path), **opts)
    if vllm:  # the loss path only; generation with vLLM is not available on CPU
        for t in (stock, fused):
            t.use_vllm, t.vllm_importance_sampling_correction = True, True
    inputs = _synthetic_batch(stock)
    # two calls: the adaptive controller's coefficient from the first window gates the second
    calls = 2 if opts.get("use_adaptive_entropy") else 1
    l_ref, g_ref = _loss_and_grads(stock, inputs, calls=calls)
    l_got, g_got = _loss_and_grads(fused, inputs, calls=calls)
    assert l_ref[0].abs() > 1e-4  # off-policy inputs: a loss that is not trivially 0
    for a, b in zip(l_got, l_ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-7)
    for ga, gb in zip(g_got, g_ref):
        assert ga.keys() == gb.keys()
        for name in gb:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-7, msg=name)
    ref_metrics, got_metrics = stock._metrics["train"], fused._metrics["train"]
    assert set(ref_metrics) <= set(got_metrics)
    for key, values in ref_metrics.items():
        assert got_metrics[key] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_cov_losses_and_repo_r_are_grpo_loss_on_fused_logprobs(model_path, tokenizer, tmp_path):
    """clip_cov / kl_cov / REPO-R: the trainer's loss is grpo_loss on its fused log-probs, scaled like dapo."""
    for opts in (dict(loss_type="kl_cov", kl_cov_ratio=0.2), dict(loss_type="clip_cov", clip_cov_ratio=0.3,
                 clip_cov_lb=-10.0, clip_cov_ub=10.0), dict(loss_type="dapo", use_repo_r=True, repo_zeta=0.05)):
        args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path), gradient_accumulation_steps=2), **opts)
        tr = FusedEntropyGRPOTrainer(model_path, reward_count_a, args, train_dataset=make_dataset(),
                                     processing_class=tokenizer)
        inputs = _synthetic_batch(tr)
        (loss,), _ = _loss_and_grads(tr, inputs)
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            lp = tr._fused_token_stats(tr.model, ids, am, 6).logprobs
            adv = inputs["advantages"]
            if opts.get("use_repo_r"):
                adv = repo_r_advantages(adv, inputs["old_per_token_logps"], 0.05)
            gen = None
            if opts["loss_type"] == "clip_cov":
                gen = torch.Generator().manual_seed(hash((0, 0, tr._step)) % (1 << 62))
            expect, m = grpo_loss(lp, adv, inputs["completion_mask"], old_logprobs=inputs["old_per_token_logps"],
                                  loss_type=opts["loss_type"], num_items_in_batch=inputs["num_items_in_batch"] / 2,
                                  generator=gen, **{k: v for k, v in opts.items() if k.startswith(("kl_cov", "clip_cov"))})
        torch.testing.assert_close(loss.detach(), expect / 2, rtol=1e-5, atol=1e-7)
        if opts["loss_type"] != "dapo":
            assert m["cov/selected_mean"] > 0
            assert tr._metrics["train"]["cov/selected_mean"] == [pytest.approx(float(m["cov/selected_mean"]))]


# ---------------------------------------------------------------------------------------------
# real training runs
# ---------------------------------------------------------------------------------------------


class _GradCapture(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_first_train_step_matches_stock_trl(tokenizer, tmp_path):
    runs = {}
    for name, trainer_cls, cfg_cls in (("stock", GRPOTrainer, GRPOConfig),
                                       ("fused", FusedEntropyGRPOTrainer, FusedEntropyGRPOConfig)):
        cap = _GradCapture()
        args = cfg_cls(**dict(BASE, output_dir=str(tmp_path / name), max_steps=1, gradient_accumulation_steps=2,
                              epsilon_high=0.28, beta=0.0))
        tr = trainer_cls(make_model(seed=1), reward_count_a, args, train_dataset=make_dataset(),
                         processing_class=tokenizer, callbacks=[cap])
        tr.train()
        runs[name] = (tr.state.log_history[0], cap.grads)
    (log_ref, g_ref), (log_got, g_got) = runs["stock"], runs["fused"]
    assert log_got["reward"] == log_ref["reward"]  # same completions were sampled
    assert log_got["loss"] == pytest.approx(log_ref["loss"], rel=1e-4, abs=1e-6)
    assert log_got["entropy"] == pytest.approx(log_ref["entropy"], rel=1e-5)
    assert g_got.keys() == g_ref.keys() and len(g_ref) > 0
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-7, msg=n)
    assert sum(g.abs().sum() for g in g_ref.values()) > 0


def _train(tokenizer, out, steps, resume=None, **opts):
    args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=out, max_steps=steps, **opts))
    tr = FusedEntropyGRPOTrainer(make_model(seed=2), reward_count_a, args, train_dataset=make_dataset(),
                                 processing_class=tokenizer)
    tr.train(resume_from_checkpoint=resume)
    logs = [h for h in tr.state.log_history if "entropy_coef" in h]
    return tr, logs


def test_adaptive_controller_follows_skywork_trl_rule(tokenizer, tmp_path):
    # near-uniform policy: entropy ~ log 64 = 4.16 < target 5, so the coefficient rises each step to the cap;
    # TRL's gate: the first window has no measurement yet, so its bonus is 0
    _, logs = _train(tokenizer, str(tmp_path), 3, gradient_accumulation_steps=2, entropy_controller="adaptive",
                     entropy_target=5.0, entropy_coef_delta=0.01, entropy_coef_max=0.025)
    assert [h["entropy_coef"] for h in logs] == pytest.approx([0.01, 0.02, 0.025])
    assert [h["entropy_coef_applied"] for h in logs] == pytest.approx([0.0, 0.01, 0.02])
    assert all(h["entropy_ctrl/window_entropy"] < 5.0 for h in logs)


def test_aent_controller_follows_band_rule_on_clamped_entropy(tokenizer, tmp_path):
    low, high, lr, init = 3.9, 4.5, 0.02, 0.001
    _, logs = _train(tokenizer, str(tmp_path), 3, entropy_controller="aent", entropy_source="clamped", clamp_p=0.33,
                     entropy_low=low, entropy_high=high, entropy_coef_lr=lr, entropy_coef=init, entropy_coef_min=0.0,
                     entropy_coef_max=0.05, entropy_coef_warmup=1)
    value = init
    for i, h in enumerate(logs):
        assert h["entropy_coef_applied"] == pytest.approx(value)  # no gate: the current value is applied
        ent = h["entropy_ctrl/window_entropy"]
        # the controller sees the clamped entropy: about log(V - floor(0.33 V)) = log 43 here, below the band
        assert ent == pytest.approx(h["clamped_entropy"], rel=1e-6) and ent < low
        if i >= 1:  # warm-up of one window
            value = min(max(value - lr * (min(0.0, ent - low) + max(0.0, ent - high)), 0.0), 0.05)
        assert h["entropy_coef"] == pytest.approx(value, rel=1e-6)
    assert logs[-1]["entropy_coef"] > init


# the entropy attributes stock GRPOTrainer 1.16 holds (public ones first); a callback reads them
TRL_ENTROPY_ATTRS = ("entropy_coef", "use_adaptive_entropy", "top_entropy_quantile", "_last_world_entropy",
                     "_entropy_bonus_enabled")


class _AttrRecorder(TrainerCallback):
    def __init__(self):
        self.trainer, self.seen = None, []

    def _record(self, when):
        self.seen.append((when, {a: getattr(self.trainer, a) for a in TRL_ENTROPY_ATTRS}))

    def on_train_begin(self, args, state, control, **kwargs):
        self._record("begin")

    def on_step_end(self, args, state, control, **kwargs):
        self._record(state.global_step)


@pytest.mark.parametrize("ga", [1, 2], ids=["ga1", "ga2"])
def test_train_with_adaptive_entropy_public_attributes_match_stock(tokenizer, tmp_path, ga):
    """TRL's test_train_with_adaptive_entropy, with the trainer's attributes compared to stock TRL's
    after every optimizer step: entropy (~log 64 = 4.16) stays below the target, so the coefficient
    rises by delta each step (0.1 -> 0.13) and the gate opens after the first window."""
    steps, runs = 3, {}
    for name, trainer_cls, cfg_cls in (("stock", GRPOTrainer, GRPOConfig),
                                       ("fused", FusedEntropyGRPOTrainer, FusedEntropyGRPOConfig)):
        rec = _AttrRecorder()
        args = cfg_cls(**dict(BASE, output_dir=str(tmp_path / name), max_steps=steps, gradient_accumulation_steps=ga,
                              use_adaptive_entropy=True, entropy_coef=0.1, entropy_target=5.0,
                              entropy_coef_delta=0.01, entropy_coef_max=0.5))
        tr = trainer_cls(make_model(seed=3), reward_count_a, args, train_dataset=make_dataset(),
                         processing_class=tokenizer, callbacks=[rec])
        rec.trainer = tr
        tr.train()
        runs[name] = rec.seen
    stock, fused = runs["stock"], runs["fused"]
    assert [w for w, _ in fused] == [w for w, _ in stock] == ["begin", *range(1, steps + 1)]
    for (when, want), (_, got) in zip(stock, fused):
        for a in TRL_ENTROPY_ATTRS:
            assert type(got[a]) is type(want[a]), (when, a, got[a], want[a])
            assert got[a] == pytest.approx(want[a], rel=1e-5), (when, a, got[a], want[a])
    assert stock[-1][1]["entropy_coef"] == pytest.approx(0.13) and stock[-1][1]["use_adaptive_entropy"] is True
    assert math.isinf(stock[0][1]["_last_world_entropy"]) and stock[-1][1]["_last_world_entropy"] < 5.0


def test_assigning_trl_entropy_attributes_drives_the_controller(tokenizer, tmp_path):
    """What TRL's own resume code and user callbacks do: assign entropy_coef / _last_world_entropy."""
    def build(**opts):
        args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path)), **opts)
        return FusedEntropyGRPOTrainer(make_model(), reward_count_a, args, train_dataset=make_dataset(),
                                       processing_class=tokenizer)

    tr = build(use_adaptive_entropy=True, entropy_target=0.5)
    assert tr.use_adaptive_entropy is True and tr.entropy_coef == 0.0 and math.isinf(tr._last_world_entropy)
    assert tr._entropy_ctrl.coef == 0.0  # TRL's gate: closed before the first window
    tr.entropy_coef, tr._last_world_entropy = 0.07, 0.3
    assert tr._entropy_ctrl.value == pytest.approx(0.07) and tr._entropy_ctrl.coef == pytest.approx(0.07)
    tr._last_world_entropy = 0.9  # above the target: gate closed, value kept
    assert tr._entropy_ctrl.coef == 0.0 and tr.entropy_coef == pytest.approx(0.07)
    with pytest.raises(ValueError, match="value"):
        tr.entropy_coef = float("nan")
    with pytest.raises(AttributeError, match="fixed by the config"):
        tr.use_adaptive_entropy = False

    static = build(entropy_coef=0.02)
    assert static.use_adaptive_entropy is False and static._entropy_bonus_enabled is True
    static.entropy_coef = 0.05
    assert static._entropy_ctrl.coef == pytest.approx(0.05) and static.entropy_coef == pytest.approx(0.05)
    aent = build(entropy_controller="aent", entropy_low=1.0, entropy_high=2.0, entropy_coef_lr=0.1, entropy_coef=0.01)
    assert aent.use_adaptive_entropy is False and aent.entropy_coef == pytest.approx(0.01)
    off = build()
    assert off.use_adaptive_entropy is False and off._entropy_bonus_enabled is False and off.entropy_coef == 0.0


def test_resume_restores_controller(tokenizer, tmp_path):
    opts = dict(gradient_accumulation_steps=1, entropy_controller="adaptive", entropy_target=5.0,
                entropy_coef_delta=0.01, save_strategy="steps", save_steps=2)
    out = str(tmp_path / "run")
    first, _ = _train(tokenizer, out, 2, **opts)
    ckpt = os.path.join(out, "checkpoint-2")
    with open(os.path.join(ckpt, "fused_entropy_state.json")) as f:
        saved = json.load(f)["entropy_controller"]
    assert saved == first._entropy_ctrl.state_dict() and saved["value"] == pytest.approx(0.02)
    with open(os.path.join(ckpt, "entropy_ctrl_state.json")) as f:  # TRL's own file, for stock GRPOTrainer
        assert json.load(f)["entropy_coef"] == pytest.approx(0.02)

    resumed, logs = _train(tokenizer, out, 3, resume=ckpt, **opts)
    step3 = [h for h in logs if h["step"] == 3]
    assert len(step3) == 1
    assert step3[0]["entropy_coef_applied"] == pytest.approx(0.02)  # restored value, gate open
    assert step3[0]["entropy_coef"] == pytest.approx(0.03)
    assert resumed._entropy_ctrl.num_steps == 3


def test_resume_from_stock_trl_adaptive_checkpoint(tokenizer, tmp_path):
    args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path)), use_adaptive_entropy=True, entropy_target=0.5)
    tr = FusedEntropyGRPOTrainer(make_model(), reward_count_a, args, train_dataset=make_dataset(),
                                 processing_class=tokenizer)
    with open(tmp_path / "entropy_ctrl_state.json", "w") as f:
        json.dump({"entropy_coef": 0.07, "last_world_entropy": 0.3}, f)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    tr._load_optimizer_and_scheduler(str(tmp_path))
    assert tr._entropy_ctrl.value == pytest.approx(0.07) and tr._entropy_ctrl.coef == pytest.approx(0.07)


def test_repo_r_and_kl_cov_train(tokenizer, tmp_path):
    _, _ = _train(tokenizer, str(tmp_path), 2, loss_type="kl_cov", use_repo_r=True, repo_zeta=0.01,
                  entropy_coef=0.01)
    tr, logs = _train(tokenizer, str(tmp_path / "b"), 3, use_repo_r=True, repo_zeta=0.01, repo_entropy_target=5.0,
                      entropy_coef=0.01)
    # entropy below the target every step: zeta doubles each window up to its cap 0.05
    assert [h["repo/zeta"] for h in logs] == pytest.approx([0.02, 0.04, 0.05])
    assert all(math.isfinite(h["loss"]) for h in logs)


# ---------------------------------------------------------------------------------------------
# no [B, T, V] logits in the loss path
# ---------------------------------------------------------------------------------------------


def _op_impls():
    from fused_entropy import _custom_ops
    from fused_entropy._grpo import objective_op

    defs = [getattr(m, n) for m in (_custom_ops, objective_op) for n in dir(m)
            if n.endswith("_op") and hasattr(getattr(m, n), "_init_fn")]
    return {d._opoverload: d._init_fn for d in defs}


_OP_IMPLS = _op_impls()


class _VocabTensors(TorchDispatchMode):
    """Records the row count of every new tensor an op produces whose last dimension is the vocabulary."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = _OP_IMPLS.get(func)
        if impl is not None:  # a fused_entropy custom op: watch the ops inside it too
            with self:
                return impl(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # views (W.T) allocate nothing
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == V:
                self.rows.append(t.numel() // V)
        return out


def test_loss_path_allocates_no_logits(tokenizer, tmp_path, monkeypatch):
    from fused_entropy.backends import torch_chunked

    chunk = 4
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", chunk * V)  # tiles of 4 rows x V
    monkeypatch.setattr(torch_chunked, "MIN_CHUNK_ROWS", 1)
    args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path), max_steps=2, gradient_accumulation_steps=2,
                                         entropy_coef=0.01, entropy_source="clamped", topk=16, beta=0.0))
    model = make_model()
    tr = FusedEntropyGRPOTrainer(model, reward_count_a, args, train_dataset=make_dataset(), processing_class=tokenizer)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    seen = {"rows": [], "calls": 0, "tokens": 0}
    original = tr._compute_loss

    def watched(model_, inputs):
        mode = _VocabTensors()
        n_head = len(head_calls)
        with mode:
            loss = original(model_, inputs)
            loss.backward(retain_graph=True)  # the backward of the loss path is watched too
        model_.zero_grad()
        assert len(head_calls) == n_head, "lm_head was called in the loss path"
        seen["rows"] += mode.rows
        seen["calls"] += 1
        seen["tokens"] = max(seen["tokens"], int(inputs["completion_mask"].numel()))
        return loss

    monkeypatch.setattr(tr, "_compute_loss", watched)
    tr.train()
    assert seen["calls"] == 4 and seen["tokens"] >= 16
    assert seen["rows"], "no vocabulary-sized tile was seen: the check is not watching the head"
    assert max(seen["rows"]) <= chunk < seen["tokens"]

    # the detector does catch logits: the plain model forward makes a [B, T, V] tensor
    mode = _VocabTensors()
    with mode, torch.no_grad():
        model(input_ids=torch.randint(4, V, (4, 8)))
    assert max(mode.rows) >= 32


# ---------------------------------------------------------------------------------------------
# bad options fail at construction
# ---------------------------------------------------------------------------------------------

BAD = {
    "clamped-without-k": (dict(entropy_source="clamped"), "entropy_source='clamped' needs topk or clamp_p"),
    "topk-and-clamp_p": (dict(topk=4, clamp_p=0.2), "at most one of topk and clamp_p"),
    "entropy_source": (dict(entropy_source="half"), "entropy_source must be one of"),
    "clamp_p-range": (dict(clamp_p=1.5), "clamp_p must be in"),
    "controller-name": (dict(entropy_controller="pid"), "entropy_controller must be one of"),
    "adaptive-and-aent": (dict(use_adaptive_entropy=True, entropy_controller="aent", entropy_low=1.0,
                               entropy_high=2.0, entropy_coef_lr=0.1), "use_adaptive_entropy=True conflicts"),
    "aent-missing-band": (dict(entropy_controller="aent", entropy_low=1.0), "entropy_high, entropy_coef_lr"),
    "aent-low-above-high": (dict(entropy_controller="aent", entropy_low=2.0, entropy_high=1.0,
                                 entropy_coef_lr=0.1), "low must be <= high"),
    "adaptive-coef-bounds": (dict(use_adaptive_entropy=True, entropy_coef_min=0.5, entropy_coef_max=0.1),
                             "coef_min must be <= coef_max"),
    "loss_type": (dict(loss_type="ppo"), "loss_type must be one of"),
    "kl_cov-sequence": (dict(loss_type="kl_cov", importance_sampling_level="sequence"), "is token-level"),
    "top_entropy_quantile-negative": (dict(top_entropy_quantile=-0.1), "top_entropy_quantile must be in \\[0, 1\\]"),
    "vespo-offpolicy": (dict(loss_type="vespo", off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    "clip_cov-bounds": (dict(loss_type="clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb must be < clip_cov_ub"),
    "repo-bounds": (dict(use_repo_r=True, repo_zeta=0.5), "init must be in"),
    "backend": (dict(fused_backend="cuda"), "fused_backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_options_fail_at_config(case, tmp_path):
    opts, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path)), **opts)


def test_bad_options_fail_at_trainer_construction(tokenizer, tmp_path):
    args = FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path)), topk=V + 1)
    with pytest.raises(ValueError, match=f"topk must be in \\[1, V={V}\\]"):
        FusedEntropyGRPOTrainer(make_model(), reward_count_a, args, train_dataset=make_dataset(),
                                processing_class=tokenizer)
    # a plain GRPOConfig is checked the same way (TRL itself would only fail in the first loss call)
    plain = GRPOConfig(**dict(BASE, output_dir=str(tmp_path)), loss_type="ppo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        FusedEntropyGRPOTrainer(make_model(), reward_count_a, plain, train_dataset=make_dataset(),
                                processing_class=tokenizer)


def test_untested_trl_version_warns_instead_of_raising():
    from fused_entropy.integrations.trl import SUPPORTED_TRL, check_trl_version

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trl_version(SUPPORTED_TRL[0] + ".3")  # a tested release: silent
    with pytest.warns(UserWarning, match=r"tested with TRL 1\.16\.x; found trl 1\.99\.0"):
        check_trl_version("1.99.0")


def test_import_under_an_untested_trl_warns_and_works():
    """The import itself, in a fresh interpreter whose TRL reports a release outside SUPPORTED_TRL."""
    import subprocess
    import sys

    code = (
        "import warnings, trl; trl.__version__ = '1.99.0'\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    from fused_entropy.integrations.trl import FusedEntropyGRPOTrainer\n"
        "print([str(w.message) for w in seen if 'found trl 1.99.0' in str(w.message)])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tested with TRL 1.16.x; found trl 1.99.0" in res.stdout


# --- controller state in trainer_state.json (ControllerStateCallback) ---------------------------

STATE_OPTS = dict(gradient_accumulation_steps=1, entropy_controller="adaptive", entropy_target=5.0,
                  entropy_coef_delta=0.01, save_strategy="steps", save_steps=1, use_repo_r=True)


def _saved_entry(ckpt):
    with open(os.path.join(ckpt, "trainer_state.json")) as f:
        return json.load(f)["stateful_callbacks"].get("ControllerStateCallback")


def _edit_json(path, edit):
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def test_controller_state_is_saved_in_trainer_state_json_and_wins_on_resume(tokenizer, tmp_path):
    out = str(tmp_path / "run")
    first, _ = _train(tokenizer, out, 2, **STATE_OPTS)
    ckpt = os.path.join(out, "checkpoint-2")
    entry = _saved_entry(ckpt)
    assert entry == {"args": {}, "attributes": json.loads(json.dumps(first.controller_state()))}
    assert entry["attributes"]["entropy_controller"]["value"] == pytest.approx(0.02)
    assert entry["attributes"]["repo_zeta"] is not None
    assert _saved_entry(os.path.join(out, "checkpoint-1"))["attributes"]["entropy_controller"]["value"] == pytest.approx(0.01)
    # the side file disagrees: trainer_state.json's entry is the one read
    _edit_json(os.path.join(ckpt, "fused_entropy_state.json"), lambda d: d["entropy_controller"].update(value=0.2))
    resumed, logs = _train(tokenizer, out, 3, resume=ckpt, **STATE_OPTS)
    (step3,) = [h for h in logs if h["step"] == 3]
    assert step3["entropy_coef_applied"] == pytest.approx(0.02) and step3["entropy_coef"] == pytest.approx(0.03)
    assert _saved_entry(os.path.join(out, "checkpoint-3"))["attributes"] == json.loads(json.dumps(resumed.controller_state()))


def test_resume_reads_the_side_file_of_an_older_checkpoint(tokenizer, tmp_path):
    """A checkpoint written before the callback: no trainer_state.json entry, fused_entropy_state.json."""
    out = str(tmp_path / "run")
    _train(tokenizer, out, 2, **STATE_OPTS)
    ckpt = os.path.join(out, "checkpoint-2")
    _edit_json(os.path.join(ckpt, "trainer_state.json"), lambda d: d["stateful_callbacks"].pop("ControllerStateCallback"))
    _edit_json(os.path.join(ckpt, "fused_entropy_state.json"), lambda d: d["entropy_controller"].update(value=0.05))
    _edit_json(os.path.join(ckpt, "fused_entropy_state.json"), lambda d: d["repo_zeta"].update(value=0.0123))
    resumed, logs = _train(tokenizer, out, 3, resume=ckpt, **STATE_OPTS)
    (step3,) = [h for h in logs if h["step"] == 3]
    assert step3["entropy_coef_applied"] == pytest.approx(0.05) and step3["entropy_coef"] == pytest.approx(0.06)
    assert resumed._entropy_ctrl.num_steps == 3
    # REPO's zeta went on from the side file's value: one step doubles, halves or keeps it
    assert any(resumed._repo.zeta == pytest.approx(0.0123 * f) for f in (0.5, 1.0, 2.0)), resumed._repo.zeta
    # the first save after such a resume writes the entry (Trainer would fail on the missing name)
    entry = _saved_entry(os.path.join(out, "checkpoint-3"))
    assert entry["attributes"]["entropy_controller"]["value"] == pytest.approx(0.06)


def test_resume_with_restore_callback_states(tokenizer, tmp_path):
    """restore_callback_states_from_checkpoint=True: transformers rebuilds the callback from the
    checkpoint; the trainer binds the new one, so later saves still read its controllers."""
    out = str(tmp_path / "run")
    _train(tokenizer, out, 2, **STATE_OPTS)
    resumed, logs = _train(tokenizer, out, 3, resume=os.path.join(out, "checkpoint-2"),
                           restore_callback_states_from_checkpoint=True, **STATE_OPTS)
    (step3,) = [h for h in logs if h["step"] == 3]
    assert step3["entropy_coef_applied"] == pytest.approx(0.02)
    from fused_entropy.integrations.trl import ControllerStateCallback

    cbs = [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, ControllerStateCallback)]
    assert len(cbs) == 1 and cbs[0].trainer is resumed
    entry = _saved_entry(os.path.join(out, "checkpoint-3"))
    assert entry["attributes"]["entropy_controller"]["value"] == pytest.approx(0.03)


def test_sampling_replay_options(tmp_path):
    """GRPOConfig's top_k/top_p/min_p become the head's truncation; the switch needs vLLM's IS correction."""
    from fused_entropy.integrations.trl import sampling_truncation

    off = GRPOConfig(**dict(BASE, output_dir=str(tmp_path), top_k=0, top_p=1.0, min_p=None))
    assert sampling_truncation(off) is None
    on = GRPOConfig(**dict(BASE, output_dir=str(tmp_path), top_k=20, top_p=0.95, min_p=0.05))
    assert sampling_truncation(on) == (20, 0.95, 0.05)
    with pytest.raises(ValueError, match="sampling_replay=True needs use_vllm=True"):
        FusedEntropyGRPOConfig(**dict(BASE, output_dir=str(tmp_path), sampling_replay=True, top_k=20))
    from fused_entropy.integrations.trl.config import _check_replayable
    from types import SimpleNamespace

    ok = dict(top_k=20, top_p=0.95, min_p=None, repetition_penalty=1.0, generation_kwargs=None)
    _check_replayable(SimpleNamespace(**ok))
    for bad, match in ((dict(min_p=2.0), "min_p must be in"), (dict(top_p=0.0), "top_p must be in"),
                       (dict(top_p=1.5), "top_p must be in"), (dict(top_k=-5), "top_k must be"),
                       (dict(repetition_penalty=1.2), "cannot replay repetition_penalty"),
                       (dict(generation_kwargs={"top_p": 0.5}), r"generation_kwargs overrides \['top_p'\]")):
        with pytest.raises(ValueError, match=match):
            _check_replayable(SimpleNamespace(**dict(ok, **bad)))


def test_sampling_replay_head_returns_truncated_logprobs():
    """HeadRequest(sampling=...) gives the truncated log-probs (full ones where the target is dropped)."""
    from fused_entropy import linear_logprobs
    from fused_entropy.integrations.trl import HeadRequest, install_fused_head

    torch.manual_seed(0)
    model = make_model().double()
    install_fused_head(model, temperature=0.7)
    ids = torch.randint(4, len(VOCAB), (2, 9))
    mask = torch.ones_like(ids)
    k = 5
    got = model(input_ids=ids, attention_mask=mask, fused_entropy=HeadRequest(k, sampling=(40, 0.95, None)))
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -k - 1:-1]
    want = linear_logprobs(hidden, model.lm_head.weight, ids[:, -k:], temperature=0.7, entropy=False,
                           sampling_top_k=40, sampling_top_p=0.95)
    trunc = want.truncated_logprobs
    assert bool(torch.isfinite(trunc).any())
    expect = torch.where(torch.isinf(trunc), want.logprobs, trunc)
    torch.testing.assert_close(got.logprobs, expect, rtol=1e-12, atol=1e-12)
