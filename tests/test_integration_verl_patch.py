"""integrations.verl.patch()/unpatch() against a stand-in of verl's module layout.

verl does not install next to this test stack on CPU (verl 0.9.1 needs ray[default], tensordict,
hydra, wandb and transformers < 5.11; ``import verl`` imports ray), so the test writes a stand-in
package to disk and imports it through the ordinary import system: the same dotted names, and each
module binds ``linear_cross_entropy`` the way verl's does (read from the verl 0.9.1 wheel and verl
main at b178a3cd):

- ``verl/utils/kernel/linear_cross_entropy.py`` defines it (``LinearCrossEntropy.apply``);
- ``verl/models/transformers/{dense_common,qwen2_vl,qwen3_vl,qwen3_5,glm4v}.py``: the FSDP forward
  ``forward_with_triton_backend`` runs ``from verl.utils.kernel.linear_cross_entropy import
  linear_cross_entropy`` inside the function and calls it with ``(hidden, lm_head.weight,
  rolled_labels, temperature, "none")``;
- ``verl/models/mcore/{model_forward_fused,model_forward_1f1b_overlap}.py`` import it at module level
  and call it with ``(..., temperature, "none", tp_group)``.
"""
import importlib
import sys
import textwrap

import pytest
import torch

from fused_entropy.integrations import verl as fe_verl

FSDP_MODULES = ("dense_common", "qwen2_vl", "qwen3_vl", "qwen3_5", "glm4v")
MCORE_MODULES = ("model_forward_fused", "model_forward_1f1b_overlap")

KERNEL_SRC = '''
import torch


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        raise RuntimeError("verl's Triton kernel (stand-in) was called")


linear_cross_entropy = LinearCrossEntropy.apply
'''

FSDP_SRC = '''
import torch


def forward_with_triton_backend(self, input_ids=None, labels=None, temperature: float = 1.0, **loss_kwargs):
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    hidden_states = self.model(input_ids)
    rolled_labels = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    log_probs, entropy = linear_cross_entropy(hidden_states, self.lm_head.weight, rolled_labels, temperature, "none")
    return log_probs, entropy
'''

MCORE_SRC = '''
from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy


def fused_head(hidden_states, output_weight, labels, temperature, tp_group=None):
    logprobs, entropy = linear_cross_entropy(hidden_states, output_weight, labels, temperature, "none", tp_group)
    return logprobs, entropy
'''


@pytest.fixture
def verl(tmp_path, monkeypatch):
    """The stand-in package on sys.path (ahead of any installed verl), removed afterwards."""
    files = {"verl/utils/kernel/linear_cross_entropy.py": KERNEL_SRC}
    files.update({f"verl/models/transformers/{m}.py": FSDP_SRC for m in FSDP_MODULES})
    files.update({f"verl/models/mcore/{m}.py": MCORE_SRC for m in MCORE_MODULES})
    for pkg in ("verl", "verl/utils", "verl/utils/kernel", "verl/models", "verl/models/transformers", "verl/models/mcore"):
        files[f"{pkg}/__init__.py"] = ""
    for rel, src in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    saved = {k: v for k, v in sys.modules.items() if k == "verl" or k.startswith("verl.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    fe_verl.unpatch()
    for k in [k for k in sys.modules if k == "verl" or k.startswith("verl.")]:
        del sys.modules[k]
    sys.modules.update(saved)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=23, hid=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.model = torch.nn.Embedding(vocab, hid, dtype=torch.float64)
        self.lm_head = torch.nn.Linear(hid, vocab, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(vocab, hid, generator=g, dtype=torch.float64))
            self.lm_head.weight.copy_(torch.randn(vocab, hid, generator=g, dtype=torch.float64) / hid**0.5)


def _reference(hidden, weight, labels, temperature):
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T) / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, labels.reshape(-1, 1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _mcore(name):
    return importlib.import_module(f"verl.models.mcore.{name}")


def test_fsdp_forwards_use_fused_entropy_while_patched(verl):
    original = verl.linear_cross_entropy
    lm, ids = _TinyLM(), torch.randint(0, 23, (1, 9), generator=torch.Generator().manual_seed(1))
    for m in FSDP_MODULES:
        forward = importlib.import_module(f"verl.models.transformers.{m}").forward_with_triton_backend
        with pytest.raises(RuntimeError, match="stand-in"):
            forward(lm, input_ids=ids, temperature=0.7)
        fe_verl.patch()
        assert fe_verl.is_patched()
        lp, ent = forward(lm, input_ids=ids, temperature=0.7)
        lp.sum().backward()
        hidden = lm.model(ids).detach().requires_grad_()
        want_lp, want_ent = _reference(hidden, lm.lm_head.weight, torch.roll(ids, -1, -1), 0.7)
        torch.testing.assert_close(lp, want_lp)
        torch.testing.assert_close(ent, want_ent)
        assert lm.lm_head.weight.grad is not None and lm.model.weight.grad is not None
        lm.zero_grad()
        fe_verl.unpatch()
        assert verl.linear_cross_entropy is original and not fe_verl.is_patched()


def test_megatron_modules_imported_before_the_patch_are_rebound(verl):
    original = verl.linear_cross_entropy
    mods = [_mcore(m) for m in MCORE_MODULES]
    assert all(m.linear_cross_entropy is original for m in mods)
    fe_verl.patch()
    assert all(m.linear_cross_entropy is fe_verl.linear_cross_entropy for m in mods)
    h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 10, 7, 7])
    for m in mods:
        lp, ent = m.fused_head(h, w, labels, 1.0, None)
        torch.testing.assert_close((lp, ent), _reference(h, w, labels, 1.0))
    fe_verl.unpatch()
    assert all(m.linear_cross_entropy is original for m in mods)


def test_megatron_modules_imported_while_patched_get_ours_and_give_it_back(verl):
    original = verl.linear_cross_entropy
    fe_verl.patch()
    mods = [_mcore(m) for m in MCORE_MODULES]  # verl builds its Megatron model after the patch
    assert all(m.linear_cross_entropy is fe_verl.linear_cross_entropy for m in mods)
    fe_verl.unpatch()
    assert all(m.linear_cross_entropy is original for m in mods)


def test_patch_is_idempotent_and_unpatch_restores_once(verl):
    original = verl.linear_cross_entropy
    mod = _mcore("model_forward_fused")
    fe_verl.patch()
    fe_verl.patch()
    assert verl.linear_cross_entropy is fe_verl.linear_cross_entropy and mod.linear_cross_entropy is fe_verl.linear_cross_entropy
    fe_verl.unpatch()
    assert verl.linear_cross_entropy is original and mod.linear_cross_entropy is original
    fe_verl.unpatch()
    assert verl.linear_cross_entropy is original and not fe_verl.is_patched()
    with fe_verl.patched():
        assert fe_verl.is_patched()
    assert verl.linear_cross_entropy is original


def test_patch_without_verl_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, fe_verl.KERNEL_MODULE, None)
    with pytest.raises(ImportError, match="needs verl"):
        fe_verl.patch()
    assert not fe_verl.is_patched()
