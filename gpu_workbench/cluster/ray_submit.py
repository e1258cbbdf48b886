"""`wb ray submit -- wb train ...`: a job on a running Ray cluster, as `ray job submit` does it.

    code = submit_job(["wb", "train", "--launcher", "ray", "--nproc", "4"], address="http://head:8265")

The working directory (default: this project) is uploaded as the job's `working_dir` (Ray puts it
first on the job's PYTHONPATH, so the job runs this checkout's code), without .git, .venv, runs/ and
other bulky paths; `env_vars` join the runtime environment. The command runs on the head node as the
job's entrypoint; `wb train --launcher ray` inside it connects to the cluster through the
RAY_ADDRESS the job sets. Logs are streamed until the job ends; the exit code is 0 only if it
SUCCEEDED.

Token authentication (Ray 2.60): with `RAY_AUTH_MODE=token` on the cluster (`ray start`) and here,
the client sends the token from `~/.ray/auth_token` (or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH);
`ray get-auth-token --generate` writes one. Keep it on; nothing here turns it off.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

EXCLUDES = [".git", ".venv", "venv", "runs", "results", ".pytest_cache", ".ruff_cache", ".benchmarks",
            "**/__pycache__", "*.pt", "*.nsys-rep", "*.ncu-rep", "*.egg-info"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def resolve_address(address: str | None) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _address_source(address: str | None) -> str:
    """Where the address came from, for an error message: the option, an environment variable or the default."""
    if address:
        return "--address"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var):
            return var
    return "the default address"


def submit_job(command: list[str], address: str | None = None, working_dir: str | Path = ".",
               env_vars: dict[str, str] | None = None, wait: bool = True, timeout_s: float = 0,
               submission_id: str | None = None, out=sys.stdout) -> int:
    """Submit `command` as the job's entrypoint; with `wait`, stream its logs and return 0 iff it succeeded."""
    if not command:
        raise UserError("no command to submit: put it after `--`, e.g. wb ray submit -- wb train --launcher ray")
    if not Path(working_dir).is_dir():
        raise UserError(f"--working-dir: not a directory: {working_dir}")
    try:
        from ray.exceptions import RpcError
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise UserError("wb ray submit needs Ray, which is not installed here: pip install 'ray[default]'") from None

    given = address
    address = resolve_address(address)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RpcError):   # nothing listens there (ConnectionError: http://, ray://, auto)
        raise UserError(f"{_address_source(given)} {address}: no Ray cluster answers there; start one with "
                        f"`ray start --head`, or give its dashboard's address (e.g. {DEFAULT_ADDRESS})") from None
    except ValueError as e:               # requests' InvalidURL is one too
        raise UserError(f"{_address_source(given)} {address} is not a Ray address ({e}); give the cluster "
                        f"dashboard's, e.g. {DEFAULT_ADDRESS}") from None
    runtime_env = {"working_dir": str(Path(working_dir).resolve()), "excludes": EXCLUDES,
                   "env_vars": {"OMP_NUM_THREADS": "1", **(env_vars or {})}}
    deadline = time.monotonic() + 90
    while True:   # a head that just started answers "No available agent to submit job" until its agent is up
        try:
            job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env,
                                       submission_id=submission_id)
            break
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"wb: submitted Ray job {job_id} to {address}: {shlex.join(command)}", file=out, flush=True)
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s if timeout_s else None
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            break
        if deadline and time.monotonic() > deadline:
            client.stop_job(job_id)
            print(f"wb: Ray job {job_id} still {status} after {timeout_s:g}s: stopped it", file=sys.stderr)
            return 1
        time.sleep(1.0)
    info = client.get_job_info(job_id)
    print(f"wb: Ray job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1
