"""Packaging (issue 17 item 4): the metadata a wheel would carry, the CI lower bounds, and the
package without Triton.

- The wheel's ``METADATA`` is generated here by setuptools' own PEP 517 hook
  (``prepare_metadata_for_build_wheel``, what pip runs before building; no compile): the Triton
  requirement carries a Linux x86_64/aarch64 marker, the license is the SPDX expression with its
  file, the extras are ranges, the version is ``fused_entropy.__version__``.
- ``ci/lower-bounds.txt`` pins exactly the lower bound of each extra's range, and under
  ``FUSED_ENTROPY_CI_LOWER_BOUNDS=1`` (set by ``.ci/run``) the installed versions are those pins.
- Without Triton (``import triton`` blocked in a fresh interpreter), ``import fused_entropy``, the
  torch backend, the GRPO loss and the integrations work, and ``backend='triton'`` is a clear error.
"""
import email.parser
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import fused_entropy

ROOT = pathlib.Path(__file__).resolve().parents[1]

# platform -> whether Triton publishes a wheel for it (and so whether it is required there)
PLATFORMS = {
    "linux-x86_64": (dict(sys_platform="linux", platform_system="Linux", platform_machine="x86_64"), True),
    "linux-aarch64": (dict(sys_platform="linux", platform_system="Linux", platform_machine="aarch64"), True),
    "macos-arm64": (dict(sys_platform="darwin", platform_system="Darwin", platform_machine="arm64"), False),
    "macos-x86_64": (dict(sys_platform="darwin", platform_system="Darwin", platform_machine="x86_64"), False),
    "windows-amd64": (dict(sys_platform="win32", platform_system="Windows", platform_machine="AMD64"), False),
    "linux-ppc64le": (dict(sys_platform="linux", platform_system="Linux", platform_machine="ppc64le"), False),
}
EXTRA_RANGES = {"liger-kernel": ">=0.8.5,<0.9", "trl": ">=1.16,<1.18"}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The wheel's METADATA, from setuptools' PEP 517 metadata hook run on the repository."""
    out = tmp_path_factory.mktemp("metadata")
    # cwd (the repository root) off sys.path: its kernels/ folder would shadow the `kernels` package
    # (Hugging Face's, a test dependency) whose setuptools hook the metadata build imports
    code = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
            "from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    dist_info = out / res.stdout.strip().splitlines()[-1]
    return email.parser.Parser().parsestr((dist_info / "METADATA").read_text())


def _requirements(meta):
    return [Requirement(r) for r in meta.get_all("Requires-Dist")]


@pytest.mark.parametrize("platform", list(PLATFORMS))
def test_triton_required_only_where_it_has_wheels(metadata, platform):
    env, needed = PLATFORMS[platform]
    (triton,) = [r for r in _requirements(metadata) if r.name == "triton"]
    assert triton.marker is not None, "triton must carry a platform marker"
    assert triton.marker.evaluate(env) is needed
    (torch_req,) = [r for r in _requirements(metadata) if r.name == "torch"]
    assert torch_req.marker is None  # torch itself is needed everywhere


def test_license_version_and_typing(metadata):
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    # one version source: the attribute the metadata is read from
    assert metadata["Version"] == fused_entropy.__version__
    assert (pathlib.Path(fused_entropy.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("extra", ["test", "bench", "liger", "trl"])
def test_extras_are_ranges(metadata, extra):
    reqs = [r for r in _requirements(metadata) if r.marker is not None and r.marker.evaluate({"extra": extra})]
    assert reqs, f"no requirements for extra {extra!r}"
    for r in reqs:
        if r.name in EXTRA_RANGES:
            assert r.specifier == SpecifierSet(EXTRA_RANGES[r.name]), (extra, str(r))
        assert not any(s.operator == "==" for s in r.specifier), f"{r} is a pin, not a range"


def _lower_bounds():
    pins = {}
    for line in (ROOT / "ci" / "lower-bounds.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name] = Version(spec.version)
    return pins


def test_ci_constraints_are_the_lower_bounds():
    pins = _lower_bounds()
    assert set(pins) == set(EXTRA_RANGES)
    for name, pin in pins.items():
        (low,) = [s for s in SpecifierSet(EXTRA_RANGES[name]) if s.operator == ">="]
        assert pin == Version(low.version), (name, pin, low)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c ci/lower-bounds.txt" in ci and "FUSED_ENTROPY_CI_LOWER_BOUNDS=1" in ci


@pytest.mark.skipif(os.environ.get("FUSED_ENTROPY_CI_LOWER_BOUNDS") != "1",
                    reason="only where .ci/run installed the lower bounds")
def test_installed_versions_are_the_lower_bounds():
    from importlib.metadata import version

    for name, pin in _lower_bounds().items():
        assert Version(version(name)) == pin, f"{name} {version(name)} installed, CI pins {pin}"


# ---------------------------------------------------------------------------------------------
# without Triton
# ---------------------------------------------------------------------------------------------

# None in sys.modules: ``import triton`` raises ModuleNotFoundError and importlib.util.find_spec
# returns None, as on a machine where triton is not installed.
_NO_TRITON = """
import sys
sys.modules["triton"] = None
import torch
"""


def _run_without_triton(body: str, interpret: bool = False) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    code = _NO_TRITON + textwrap.dedent(body)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout


def test_package_and_torch_backend_work_without_triton():
    out = _run_without_triton("""
        import fused_entropy
        from fused_entropy import LinearGRPOLoss, grpo_loss, linear_logprobs
        from fused_entropy.reference import linear_logprobs as ref_logprobs
        from fused_entropy.integrations import liger, trl, verl  # noqa: F401
        assert not any(m == "triton" or m.startswith("triton.") for m, v in sys.modules.items() if v is not None)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(5, 16, dtype=torch.float64, generator=g, requires_grad=True)
        w = torch.randn(11, 16, dtype=torch.float64, generator=g)
        t = torch.randint(0, 11, (5,), generator=g)
        for backend in ("torch", "auto"):  # auto: the torch backend on CPU
            got = linear_logprobs(x, w, t, entropy=True, backend=backend)
            want = ref_logprobs(x, w, t, entropy=True)
            torch.testing.assert_close(got.logprobs, want.logprobs)
            torch.testing.assert_close(got.entropy, want.entropy)
        got.logprobs.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        lp = torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True)
        loss, _ = grpo_loss(lp, torch.randn(2, dtype=torch.float64, generator=g), torch.ones(2, 3), backend="auto")
        loss.backward()
        h = torch.randn(2, 3, 16, generator=g, requires_grad=True)
        out = LinearGRPOLoss(beta=0.0)(h, torch.randn(11, 16, generator=g),
                                       torch.randint(0, 11, (2, 3), generator=g), torch.ones(2, 3), torch.randn(2))
        out[0].backward()
        print("ok", fused_entropy.__version__)
    """)
    assert out.startswith("ok")


# backends.resolve_name (the one "auto" rule, also behind _grpo._resolve_backend) asks whether triton is
# importable: 'auto' resolves to the torch backend without it, 'triton' raises an ImportError.


def test_auto_backend_falls_back_to_torch_without_triton():
    _run_without_triton("""
        from fused_entropy.backends import get_backend, torch_chunked
        # a CUDA device is only a label here: resolving the backend touches no GPU
        assert get_backend("auto", torch.device("cuda")) is torch_chunked
        from fused_entropy import _grpo
        assert _grpo._resolve_backend("auto", torch.device("cuda")) == "torch"
    """)


@pytest.mark.parametrize("interpret", [False, True], ids=["plain", "interpret"])
def test_triton_backend_without_triton_is_a_clear_error(interpret):
    _run_without_triton("""
        import pytest
        from fused_entropy import linear_logprobs
        x, w, t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 4])
        with pytest.raises(ImportError, match=r"(?s)triton.*backend='torch'"):
            linear_logprobs(x, w, t, backend="triton")
    """, interpret=interpret)


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists the packages explicitly (two source roots): every folder with an __init__.py
    under python/fused_entropy must be listed, or a built wheel silently leaves it out (the editable
    install would not notice)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    src = ROOT / "python" / "fused_entropy"
    found = {".".join(("fused_entropy",) + p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    found.add("fused_entropy.kernels")
    assert found - listed == set(), f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"
