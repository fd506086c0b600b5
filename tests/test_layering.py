"""The layering contract of ``[tool.importlinter]`` in pyproject.toml, checked with import-linter.

integrations / modules -> functional -> _grpo -> _autograd -> backends -> launchers -> kernels, with
leaf modules (_common, _types, _validate) importable from anywhere: lower layers never import upper
ones, not even lazily inside a function. ``lint-imports`` reads the package from a staged copy:
``kernels/`` installs as ``fused_entropy.kernels`` but lives outside ``python/fused_entropy``, so an
editable install's directory holds no kernels for import-linter to see.
"""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint_imports():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install import-linter; it is in the test extra)")
    return exe


def test_import_layers(tmp_path):
    exe = _lint_imports()
    stage = tmp_path / "fused_entropy"
    shutil.copytree(ROOT / "python" / "fused_entropy", stage, ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    shutil.copytree(ROOT / "kernels", stage / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    probe = subprocess.run([sys.executable, "-c", "import fused_entropy; print(fused_entropy.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(tmp_path)), f"the staged copy is not the one imported: {probe}"
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"layering contract broken (lint-imports):\n{out.stdout}\n{out.stderr}"
