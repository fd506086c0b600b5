#!/usr/bin/env python
"""Build the fused-entropy Hub function kernel (``hub/fused_entropy``, a ``[torch-noarch]`` project).

    python scripts/build_hub_kernel.py [--project hub/fused_entropy] [--out DIR] [--stage]

``--stage`` only writes ``<project>/torch-ext/fused_entropy/``: the sources ``kernel-builder build``
(nix) packages. Without it the script also stands in for ``kernel-builder build`` on this noarch
project, which compiles nothing: per backend of ``build.toml`` it writes ``<out>/torch-<backend>/``
(default ``<project>/build``) holding the package flattened into the variant directory, the ``_ops.py``
kernel-builder generates (``ops = torch.ops._fused_entropy_<hash>``, ``add_op_namespace_prefix``) and
``metadata.json``. ``kernels.get_local_kernel(<out>)`` loads the variant of the running torch
(``torch-cuda`` on CUDA builds, ``torch-cpu`` otherwise). Upload with ``kernel-builder``/``kernels``
tooling as usual.

The core is ``python/fused_entropy`` without ``integrations/``, ``tools/`` and ``cli.py`` (no trl,
liger or matplotlib import) plus ``kernels/`` as the ``kernels`` subpackage (the layout the installed
package has as ``fused_entropy.kernels``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fused_entropy"
KERNELS = ROOT / "kernels"
EXCLUDED = ("integrations", "tools", "cli.py", "__pycache__")

OPS_PY = '''import torch
ops = torch.ops.{ns}

def add_op_namespace_prefix(op_name: str):
    """
    Prefix op by namespace.
    """
    return f"{ns}::{{op_name}}"
'''


def _read_general(project: Path) -> dict:
    text = (project / "build.toml").read_text()
    if tomllib is not None:
        return tomllib.loads(text)["general"]
    general, section = {}, None  # the few keys used here, for Python 3.10 without tomli
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "general":
            key, value = (s.strip() for s in line.split("=", 1))
            general[key] = json.loads(value)
    return general


def _copy_tree(src: Path, dst: Path, exclude=("__pycache__",)) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*exclude, "*.pyc"))


def stage(project: Path) -> Path:
    """Write ``<project>/torch-ext/fused_entropy/`` from the core; return it."""
    dst = project / "torch-ext" / "fused_entropy"
    if dst.exists():
        shutil.rmtree(dst)
    _copy_tree(PACKAGE, dst, EXCLUDED)
    _copy_tree(KERNELS, dst / "kernels")
    return dst


def _source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(src)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:7]


def build(project: Path, out: Path | None = None) -> Path:
    """Stage the sources and write one ``torch-<backend>`` variant per backend of build.toml."""
    general = _read_general(project)
    name = general["name"]
    python_name = name.replace("-", "_")
    src = stage(project)
    ns = f"_{python_name}_{_source_hash(src)}"
    out = Path(out) if out is not None else project / "build"
    for backend in general.get("backends", ["cpu", "cuda"]):
        variant = out / f"torch-{backend}"
        if variant.exists():
            shutil.rmtree(variant)
        _copy_tree(src, variant)
        (variant / "_ops.py").write_text(OPS_PY.format(ns=ns))
        metadata = {
            "name": name,
            "id": ns,
            "version": general.get("version", 1),
            "license": general.get("license", "Apache-2.0"),
            "python-depends": [],
            "backend": {"type": backend},
        }
        (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", type=Path, default=ROOT / "hub" / "fused_entropy")
    p.add_argument("--out", type=Path, default=None, help="build directory (default <project>/build)")
    p.add_argument("--stage", action="store_true", help="only write torch-ext/ for kernel-builder")
    args = p.parse_args(argv)
    if args.stage:
        print(stage(args.project))
    else:
        print(build(args.project, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
