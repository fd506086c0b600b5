"""The AOT gate's report: one row per (build, architecture), as a table and as CSV."""
from __future__ import annotations

import csv
import os
from typing import List, Tuple

from .compile import check, occupancy

CSV_FIELDS = ["kernel", "config", "arch", "status", "regs", "stack_bytes", "local_bytes", "spill_ops",
              "smem_bytes", "blocks_per_sm", "wgmma", "mma", "num_warps", "num_stages", "compile_s", "problems"]


def _report_rows(results) -> List[dict]:
    rows = []
    for sel, arch, row in results:
        build = sel.build
        fails, warns = check(row, build, arch)
        ok = "error" not in row
        rows.append({
            "kernel": build.kernel.split(".", 1)[1], "config": sel.config(), "arch": f"sm_{arch}",
            "status": "FAIL" if fails else ("warn" if warns else "ok"),
            "regs": row.get("regs", ""), "stack_bytes": row.get("stack", ""), "local_bytes": row.get("local", ""),
            "spill_ops": row.get("spill_ops", ""),
            "smem_bytes": row["dyn_smem"] + row["static_smem"] if ok else "",
            "blocks_per_sm": occupancy(row, build, arch) if ok else "",
            "wgmma": ("yes" if row["hgmma"] else "no") if ok else "",
            "mma": ("HMMA" if row["hmma"] else "DMMA" if row["dmma"] else "no") if ok else "",
            "num_warps": build.num_warps, "num_stages": build.num_stages,
            "compile_s": row.get("compile_s", ""), "problems": "; ".join(fails + warns),
        })
    return rows


def format_table(rows: List[dict]) -> str:
    cols = [("kernel", "kernel"), ("config", "config"), ("arch", "arch"), ("regs", "regs"),
            ("stack_bytes", "spill B"), ("smem_bytes", "smem B"), ("blocks_per_sm", "blk/SM"),
            ("wgmma", "wgmma"), ("mma", "mma"), ("status", "status")]
    width = {k: max(len(h), *(len(str(r[k])) for r in rows)) if rows else len(h) for k, h in cols}
    line = lambda vals: "  ".join(str(v).ljust(width[k]) for (k, _), v in zip(cols, vals)).rstrip()
    out = [line([h for _, h in cols]), line(["-" * width[k] for k, _ in cols])]
    out += [line([r[k] for k, _ in cols]) for r in rows]
    return "\n".join(out)


def _write_reports(rows: List[dict], out_dir: str, tools: str = "") -> Tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "aot_report.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    txt_path = os.path.join(out_dir, "aot_report.txt")
    with open(txt_path, "w") as f:
        if tools:
            f.write(f"compiled with {tools}\n\n")
        f.write(format_table(rows) + "\n")
        problems = [r for r in rows if r["problems"]]
        if problems:
            f.write("\nproblems:\n")
            for r in problems:
                f.write(f"  [{r['status']}] {r['kernel']} {r['config']} {r['arch']}: {r['problems']}\n")
    return csv_path, txt_path
