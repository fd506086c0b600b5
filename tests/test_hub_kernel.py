"""The Hub function kernel (``hub/fused_entropy``): built with ``scripts/build_hub_kernel.py`` into
tmp_path, loaded with ``kernels.get_local_kernel``, forward and backward equal to the installed package.

The load runs in a subprocess started in tmp_path: from the repository root the top-level directory
``kernels/`` (this package's Triton sources) would shadow the ``kernels`` package on ``sys.path``.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r'''
import json, pathlib, sys
import torch
from kernels import get_local_kernel

k = get_local_kernel(pathlib.Path(sys.argv[1]))
heavy = sorted(m for m in ("trl", "liger_kernel", "matplotlib", "transformers") if m in sys.modules)
ns = k._ops.ops._qualified_op_name if hasattr(k._ops.ops, "_qualified_op_name") else k._ops.ops.name
import fused_entropy as fe  # the installed package, for comparison

g = torch.Generator().manual_seed(0)
x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
w = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 13, (2, 5), generator=g)
y[0, 0] = -100
out = {"module": k.__name__, "heavy": heavy, "ns": ns, "is_installed": k is fe,
       "has_ops": all(hasattr(k._ops.ops, n) for n in ("linear_logprobs", "linear_logprobs_backward",
                                                         "logprobs_from_logits", "logprobs_from_logits_backward"))}
diffs = []
for mod in (k, fe):
    s = mod.linear_logprobs(x, w, y, topk=4, temperature=0.8)
    loss = s.logprobs.sum() + 0.5 * s.entropy.sum() + 0.25 * s.clamped_entropy.sum()
    z = torch.randn(4, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    s2 = mod.logprobs_from_logits(z, y.reshape(-1)[:4].clamp(min=0))
    lp = s.logprobs.detach().clone().requires_grad_(True)
    gl, _ = mod.grpo_loss(lp, torch.tensor([1.0, -0.5], dtype=torch.float64), y != -100, loss_type="dapo")
    diffs.append([loss.detach(), *torch.autograd.grad(loss, (x, w)), s2.entropy.detach(),
                  torch.autograd.grad(s2.logprobs.sum() + s2.entropy.sum(), z)[0], gl.detach(),
                  torch.autograd.grad(gl, lp)[0]])
out["max_diff"] = max(float((a - b).abs().max()) for a, b in zip(*diffs))
out["fullgraph"] = True
try:
    f = torch.compile(lambda x, w, y: k.linear_logprobs(x, w, y).logprobs.sum(), backend="aot_eager", fullgraph=True)
    torch.autograd.grad(f(x, w, y), (x, w))
except Exception as e:  # noqa: BLE001
    out["fullgraph"] = repr(e)[:300]
print(json.dumps(out))
'''


def _load_build():
    spec = importlib.util.spec_from_file_location("build_hub_kernel", ROOT / "scripts" / "build_hub_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONSAFEPATH="1")
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    probe = _run(tmp, "-c", "import kernels.load")
    if probe.returncode != 0:
        pytest.skip("the `kernels` package is not installed (pip install kernels)")
    project = tmp / "project"
    project.mkdir()
    shutil.copy(ROOT / "hub" / "fused_entropy" / "build.toml", project / "build.toml")
    out = _load_build().build(project)
    return tmp, out


def test_build_layout(built):
    _, out = built
    for backend in ("cpu", "cuda"):
        variant = out / f"torch-{backend}"
        meta = json.loads((variant / "metadata.json").read_text())
        assert meta["name"] == "fused-entropy" and meta["backend"] == {"type": backend}
        assert meta["id"].startswith("_fused_entropy_")
        assert meta["id"] in (variant / "_ops.py").read_text()
        assert (variant / "__init__.py").exists() and (variant / "kernels" / "linear_stats.py").exists()
        assert not (variant / "integrations").exists() and not (variant / "tools").exists()
        for f in variant.rglob("*.py"):
            text = f.read_text()
            for banned in ("import trl", "from trl", "liger_kernel", "matplotlib"):
                assert banned not in text, f"{f.relative_to(variant)} mentions {banned}"


def test_get_local_kernel_forward_backward_match_installed(built):
    tmp, out = built
    r = _run(tmp, "-c", CHECK, str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["module"].startswith("_fused_entropy_") and not res["is_installed"]
    assert res["heavy"] == []
    assert res["has_ops"] and res["ns"] == res["module"]  # ops under the generated namespace
    assert res["max_diff"] < 1e-12
    assert res["fullgraph"] is True


HEAD_CHECK = r'''
import json, pathlib, sys
sys.path.append(sys.argv[2])  # tests/, for the tiny model
import torch
from _tiny_model import make_model
from fused_entropy.integrations.trl import HeadRequest, install_fused_head, kernel_function

fn = kernel_function(sys.argv[1])
torch.manual_seed(0)
outs = []
for f in (fn, None):
    model = make_model().double()
    install_fused_head(model, temperature=0.7, topk=4, **({} if f is None else {"linear_logprobs": f}))
    ids = torch.randint(4, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    st = model(input_ids=ids, attention_mask=torch.ones_like(ids),
               fused_entropy=HeadRequest(5, entropy=True, clamped=True))
    loss = st.logprobs.sum() + st.entropy.sum() + st.clamped_entropy.sum()
    g = torch.autograd.grad(loss, model.lm_head.weight)[0]
    outs.append([st.logprobs.detach(), st.entropy.detach(), st.clamped_entropy.detach(), g])
print(json.dumps({"module": fn.__module__, "max_diff": max(float((a - b).abs().max()) for a, b in zip(*outs))}))
'''


def test_trl_head_takes_linear_logprobs_from_the_kernel(built):
    """FusedEntropyGRPOConfig(fused_kernel=...) -> kernel_function -> install_fused_head: the head runs the
    kernel's linear_logprobs and gives the installed package's values and gradients."""
    pytest.importorskip("trl")
    tmp, out = built
    r = _run(tmp, "-c", HEAD_CHECK, str(out), str(ROOT / "tests"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["module"].startswith("_fused_entropy_")
    assert res["max_diff"] < 1e-12


def test_fused_kernel_option_needs_a_pinned_revision(tmp_path):
    pytest.importorskip("trl")
    from fused_entropy.integrations.trl import FusedEntropyGRPOConfig

    base = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                per_device_train_batch_size=4, num_generations=4)
    for bad in ("fused-entropy/fused-entropy", "fused-entropy/fused-entropy@main", "fused-entropy@0123abc"):
        with pytest.raises(ValueError, match="fused_kernel must be 'owner/repo@<commit sha>'"):
            FusedEntropyGRPOConfig(**base, fused_kernel=bad)
    FusedEntropyGRPOConfig(**base, fused_kernel="fused-entropy/fused-entropy@0123abc")
    FusedEntropyGRPOConfig(**base, fused_kernel=str(tmp_path))  # a local build directory
