"""Nsight Systems / Nsight Compute command lines, and the per-range summary of an nsys report.

The commands are what a performance engineer would type: nsys traces CUDA, NVTX, OS runtime, cuDNN
and cuBLAS with no CPU sampling, capturing only between the training loop's cudaProfilerStart/Stop
(steps A..B); ncu profiles only kernels inside a `wb` NVTX range.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

from gpu_workbench.profiling.errors import UsageError

NSYS_TRACE = "cuda,nvtx,osrt,cudnn,cublas"
NVTX_DOMAIN = "wb"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        product = "Nsight Systems" if name == "nsys" else "Nsight Compute"
        raise UsageError(f"{name} is not installed or not on PATH (install {product} or use --dry-run)")
    return path


def nsys_prefix(output: str, capture_range: bool = True) -> list[str]:
    """`nsys profile ...` up to the target command; `output` may hold `{rank}`."""
    cmd = ["nsys", "profile", "-t", NSYS_TRACE, "-s", "none", "--cpuctxsw=none", "--force-overwrite=true",
           "-o", output]
    if capture_range:
        cmd += ["-c", "cudaProfilerApi", "--capture-range-end=stop"]
    return cmd


def ncu_prefix(output: str, range_name: str, kernel_regex: str | None = None, section_set: str = "full") -> list[str]:
    """`ncu ...` limited to kernels launched inside the NVTX push/pop range `wb@<range_name>/`."""
    if not range_name or "/" in range_name:
        raise UsageError(f"--range={range_name!r} must be a range name such as 'fwd' or 'softmax'")
    # Push/pop ranges need the trailing slash in ncu's NVTX filter syntax.
    cmd = ["ncu", "--nvtx", "--nvtx-include", f"{NVTX_DOMAIN}@{range_name}/", "--target-processes", "all",
           "--set", section_set, "-f", "-o", output]
    if kernel_regex:
        cmd += ["-k", f"regex:{kernel_regex}"]
    return cmd


# ------------------------------------------------------------------------------------- summarize
_SUMMARY_SQL = """
WITH ranges AS (
    SELECT e.rowid AS id, COALESCE(e.text, s.value) AS name, e.start, e.end, e.globalTid
    FROM NVTX_EVENTS e LEFT JOIN StringIds s ON e.textId = s.id
    WHERE e.eventType = 59 AND e.end IS NOT NULL
),
gpu AS (
    SELECT r.id, SUM(k.end - k.start) AS kernel_ns, COUNT(k.start) AS kernels
    FROM ranges r
    JOIN CUPTI_ACTIVITY_KIND_RUNTIME rt
      ON rt.globalTid = r.globalTid AND rt.start >= r.start AND rt.end <= r.end
    JOIN CUPTI_ACTIVITY_KIND_KERNEL k ON k.correlationId = rt.correlationId
    GROUP BY r.id
)
SELECT r.name, COUNT(*) AS calls, SUM(r.end - r.start) AS cpu_ns,
       COALESCE(SUM(g.kernel_ns), 0) AS gpu_kernel_ns, COALESCE(SUM(g.kernels), 0) AS kernels
FROM ranges r LEFT JOIN gpu g ON g.id = r.id
GROUP BY r.name ORDER BY cpu_ns DESC
"""


def summarize(report: str | Path) -> list[dict]:
    """Per NVTX range: calls, CPU (wall) time and the GPU kernel time launched inside it.

    Accepts an exported `.sqlite` (tables NVTX_EVENTS, CUPTI_ACTIVITY_KIND_RUNTIME,
    CUPTI_ACTIVITY_KIND_KERNEL joined on correlationId) or a `.nsys-rep`, exported first with
    `nsys export --type sqlite`.
    """
    report = Path(report)
    if not report.exists():
        raise UsageError(f"report {report} does not exist")
    if report.suffix == ".nsys-rep":
        nsys = require_tool("nsys")
        sqlite_path = report.with_suffix(".sqlite")
        subprocess.run([nsys, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(sqlite_path),
                        str(report)], check=True)
        report = sqlite_path
    elif report.suffix != ".sqlite":
        raise UsageError(f"report {report} must be a .nsys-rep or an exported .sqlite file")
    with sqlite3.connect(report) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        needed = {"NVTX_EVENTS", "StringIds", "CUPTI_ACTIVITY_KIND_RUNTIME", "CUPTI_ACTIVITY_KIND_KERNEL"}
        if not needed <= tables:
            missing = sorted(needed - tables)
            raise UsageError(f"report {report} lacks tables {missing} (was it captured with -t cuda,nvtx?)")
        rows = db.execute(_SUMMARY_SQL).fetchall()
    return [{"range": name, "calls": calls, "cpu_ms": cpu / 1e6, "gpu_kernel_ms": gpu / 1e6, "kernels": kernels}
            for name, calls, cpu, gpu, kernels in rows]
