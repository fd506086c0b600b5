#!/usr/bin/env bash
# Run `fused-entropy gpucheck` on a GPU machine that has torch and triton but no package index.
#
#   OUT=/path/to/results bash bench/gpucheck_offline.sh [extra gpucheck arguments]
#
# Run from the repository root. Wheels of the peers (liger-kernel, trl, cut-cross-entropy and
# whatever of their requirements the machine lacks) may wait in .whl/ (see the README, "Running on
# a GPU without a package index"); they go to /tmp/site, ahead of nothing the machine already has.
# This package is installed in place (editable, no build isolation, no dependencies), so the test
# section finds tests/ next to it. Everything gpucheck prints also lands in $OUT/gpucheck.log.
set -u
if [ ! -f pyproject.toml ] || [ ! -f bench/gpucheck_offline.sh ]; then
  echo "gpucheck_offline.sh: run it from the fused-entropy repository root (bash bench/gpucheck_offline.sh)" >&2
  exit 2
fi
OUT=${OUT:-gpucheck-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  # no setuptools able to build an editable install: a plain install, and tell gpucheck where tests/ is
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/fe . >>"$OUT/install.log" 2>&1 || {
    echo "could not install fused-entropy; see $OUT/install.log"; cat "$OUT/install.log"; exit 1; }
  export PYTHONPATH="/tmp/fe${PYTHONPATH:+:$PYTHONPATH}" FUSED_ENTROPY_REPO="$PWD"
fi
export PYTHONUNBUFFERED=1
python3 -m fused_entropy.cli gpucheck --out "$OUT" "$@" 2>&1 | tee "$OUT/gpucheck.log"
exit "${PIPESTATUS[0]}"
