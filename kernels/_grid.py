"""Launch order of the GEMM kernels: which (row block, column) a program owns.

The linear head's GEMM kernels (``linear_stats``, ``linear_radix``, ``linear_dz``) cover ``n_rows``
row blocks (``BLOCK_N`` rows of x) by ``n_cols`` columns (vocabulary splits of the forward and radix
passes, vocabulary tiles of a backward chunk). Programs start roughly in launch order (grid x
fastest, then y, then z), so the programs running at one time decide what the L2 cache must hold.
The launcher runs them *grouped* (Triton's matmul tutorial calls it "L2 cache optimizations", the
``GROUP_SIZE_M`` order): grid ``(group_rows, n_cols, n_groups)``, so that the row block varies
fastest within a group and a group's programs all come before the next group's::

    group_rows = 2, 4 row blocks, 3 columns:   launch order -> (row block, column)
    (0,0) (1,0) (0,1) (1,1) (0,2) (1,2) | (2,0) (3,0) (2,1) (3,1) (2,2) (3,2)

The programs running together then read a few row blocks of x (the group's, which stay in L2 while
its columns go by) and, column by column, the same W tiles (fetched from HBM once per group and read
from L2 by the group's other row blocks). Without groups every row block of x is live at once; at
N = 8192, H = 4096 in bf16 that is 64 MiB, more than the 50 MiB of an H100/H200 L2, and x would be
re-read from HBM for every column. Row blocks that do not fill a last group go in a second launch of
their own (``block0`` > 0), so that no program of a grid is idle: a kernel that had to test for
missing row blocks would need registers that the clamped-entropy builds do not have. The launcher
sizes groups and the vocabulary split (``_launch_plan.group_rows``, ``whole_waves``); see
docs/PERFORMANCE.md ("Launch order, occupancy and waves").

The order changes which program runs when, never what a program computes: for a given vocabulary
split, results are bitwise independent of ``group_rows``. (The launcher's split depends on the group
size, the device's SMs and the kernel's occupancy, as it did on the SMs before, and the split orders
the merge of the partial sums: the same shape on the same GPU gives the same bits, run to run.)
"""
import triton
import triton.language as tl


@triton.jit
def grouped_program(block0):
    """(row block, column) of this program in a grid ``(group_rows, n_cols, n_groups)`` whose first
    row block is ``block0``: ``block0 + group * group_rows + program_id(0)`` and ``program_id(1)``
    (the column count is ``tl.num_programs(1)``)."""
    return block0 + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0), tl.program_id(1)
