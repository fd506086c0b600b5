"""Count the SASS a ``tl.histogram`` compiles to for sm_90 with the installed Triton (no GPU needed).

    env -u TRITON_INTERPRET python scripts/histogram_sass.py NBINS BLOCK      # e.g. 2048 1024

Compiles a one-row-per-program kernel that histograms the top log2(NBINS) bits of fp32 keys (NBINS a
power of two), BLOCK keys per loop step, 8 warps, and prints the static instruction count of the whole
kernel (its loop body is almost all of it) with the shared-memory atomics (ATOMS), warp votes (VOTE)
and popcounts (POPC) in it, read with Triton's bundled cuobjdump, and the shared memory Triton
allocates (``metadata.shared``; cuobjdump's SHARED counts only the static part). Used for docs/PERFORMANCE.md ("Per-row histograms in shared
memory"); results in bench/results/aot/2026-11-30-triton-releases.md.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def hist_kernel(z_ptr, out_ptr, V, NB: tl.constexpr, SHIFT: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0)
    acc = tl.zeros([NB], dtype=tl.int32)
    for v0 in range(0, V, BV):
        offs = v0 + tl.arange(0, BV)
        z = tl.load(z_ptr + row * V + offs, mask=offs < V, other=0.0)
        digit = (z.to(tl.uint32, bitcast=True) >> SHIFT).to(tl.int32)
        acc += tl.histogram(digit, NB, mask=offs < V)
    tl.store(out_ptr + row * NB + tl.arange(0, NB), acc)


def main(nbins: int, block: int) -> str:
    bits = nbins.bit_length() - 1
    src = ASTSource(hist_kernel, signature={"z_ptr": "*fp32", "out_ptr": "*i32", "V": "i32", "NB": "constexpr",
                                            "SHIFT": "constexpr", "BV": "constexpr"},
                    constexprs={"NB": nbins, "SHIFT": 32 - bits, "BV": block})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    ops = [line.split()[1] for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line)]
    count = collections.Counter(op.split(".")[0] for op in ops)
    picked = {k: count[k] for k in ("ATOMS", "VOTE", "POPC") if count[k]}
    usage = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", res).group(0)
    return (f"triton {triton.__version__}: {nbins} bins, {block} keys per step: {len(ops)} instructions {picked} "
            f"{usage}, {kernel.metadata.shared} B shared memory allocated")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("histogram_sass.py compiles for a GPU: run it without TRITON_INTERPRET")
    if len(sys.argv) != 3 or not all(a.isdigit() for a in sys.argv[1:]):
        sys.exit("usage: python scripts/histogram_sass.py NBINS BLOCK   (e.g. 2048 1024; NBINS a power of two)")
    nbins, block = int(sys.argv[1]), int(sys.argv[2])
    if nbins < 2 or nbins & (nbins - 1) or block < 1 or block & (block - 1):
        sys.exit(f"NBINS and BLOCK must be powers of two (NBINS >= 2), got {nbins} and {block}")
    print(main(nbins, block))
