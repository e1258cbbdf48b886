"""What a finished Slurm job did, for `wb slurm render --submit --wait`: its final state and exit code
(`scontrol show job`), the run directory, and on failure the failing node's log and its last error line.

    lines, failed = outcome(job_id, code, log_dir, run_dir)   # code: sbatch --wait's exit status

The failing node is the task srun reported in the batch log ("srun: error: HOST: task N: Exited with exit code
C"; one task per node, so task N writes `<log_dir>/<job id>/node-N.out`), else the first node log holding an
error line. Its last error line is its last `wb: error:` line, else the last exception line of a traceback.
No accounting database is needed: scontrol keeps a finished job for MinJobAge (300 s by default).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

_TASK = re.compile(r"srun: error: \S+: tasks? (\d+)")
_EXCEPTION = re.compile(r"^\w[\w.]*(Error|Exception|Exit|Interrupt)\b.*")
_RANK_PREFIX = re.compile(r"^(\[[\w-]+\]:\s*)+")   # torchrun's "[default0]:" and "[rank0]: " before a rank's line


def job_fields(job_id: str) -> dict[str, str]:
    """scontrol's record of the job (JobState, ExitCode, StdOut, ...), {} when it has none."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return {}
    done = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def last_error_line(lines: list[str]) -> str:
    """The last `wb: error:` line (the project's one-line refusals), else the last exception line, else "";
    without torchrun's rank prefixes."""
    lines = [_RANK_PREFIX.sub("", line.strip()) for line in lines]
    ours = [line for line in lines if line.startswith("wb: error:")]
    if ours:
        return ours[-1]
    raised = [line for line in lines if _EXCEPTION.match(line)]
    return raised[-1] if raised else ""


def failing_node_log(job_dir: Path, batch_log: list[str]) -> Path | None:
    """The log of the node srun reported as failed, else the first node log with an error line."""
    for line in batch_log:
        match = _TASK.search(line)
        if match and (job_dir / f"node-{match.group(1)}.out").is_file():
            return job_dir / f"node-{match.group(1)}.out"
    nodes = sorted(job_dir.glob("node-*.out"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    return next((p for p in nodes if last_error_line(_read(p))), nodes[0] if nodes else None)


def outcome(job_id: str, code: int, log_dir: str, run_dir: str) -> tuple[list[str], bool]:
    """The report's lines, and whether the job failed (a state other than COMPLETED, or a non-zero code)."""
    job = job_fields(job_id)
    state = job.get("JobState", "")
    exit_code = job.get("ExitCode", f"{code}:0").split(":")[0]
    failed = state != "COMPLETED" or code != 0 or exit_code != "0"
    known = state or "state unknown (scontrol has no record of it)"
    lines = [f"wb: job {job_id} {known}, exit code {exit_code}",
             f"wb: run directory: {run_dir or 'none named (the job chose its own: see the node logs)'}"]
    job_dir = Path(log_dir) / job_id
    if not failed:
        lines.append(f"wb: logs: {job_dir}/ (node-N.out per node, rank logs under it)")
        return lines, False
    batch_log = Path(job.get("StdOut", "")) if job.get("StdOut") else None
    node = failing_node_log(job_dir, _read(batch_log) if batch_log else [])
    if node is None:
        lines.append(f"wb: no node log under {job_dir}/; the batch log: {batch_log or 'unknown'}")
        return lines, True
    lines.append(f"wb: failing node's log: {node}")
    error = last_error_line(_read(node)) or (last_error_line(_read(batch_log)) if batch_log else "")
    lines.append(f"wb: its last error line: {error or '(none: see the log)'}")
    return lines, True
