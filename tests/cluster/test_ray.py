"""Ray: a real `ray start --head` on 127.0.0.1 with token authentication (Ray 2.60), started and
stopped here; `wb ray submit` runs `wb train --launcher ray` on it: 2 Ray Train workers (gloo), rank 1
killed at step 3, FailureConfig(max_failures=1) restarts the group, which resumes from the checkpoint
after step 2 and ends with the uninterrupted torchrun run's parameters. A client without the token
is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.cluster import common
from tests.cluster.common import JOB, KILL, ROOT, TINY, final_params, losses, max_rel_diff, summary, wb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(dashboard URL, env with RAY_AUTH_MODE=token and HOME holding the token)."""
    home = tmp_path_factory.mktemp("home")
    temp_dir = f"/tmp/wbray-{os.getpid()}"   # Ray's socket paths must stay short
    auth = common.env(HOME=str(home), RAY_AUTH_MODE="token", RAY_worker_niceness="0")   # parallel/runtime/local_ray.py
    subprocess.run([f"{common.VENV_BIN}/ray", "get-auth-token", "--generate"], env=auth, check=True,
                   capture_output=True,
                   timeout=60)
    assert (home / ".ray" / "auth_token").is_file()
    port, dash = common.free_port(), common.free_port()
    head = subprocess.Popen([f"{common.VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                             "--num-cpus", "3", "--disable-usage-stats", "--temp-dir", temp_dir,
                             "--include-dashboard", "true"],
                            env=auth, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:   # the job API answers once the dashboard is up (401 without a token is also "up")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the Ray head did not come up within 120 s"
                time.sleep(1)
        yield url, auth
    finally:   # only the processes this fixture started: its own session (process group)
        for sig, wait in ((signal.SIGTERM, 2), (signal.SIGKILL, 5)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        subprocess.run(["rm", "-rf", temp_dir], check=False)


def test_submit_without_token_is_refused(ray_head, tmp_path):
    url, _ = ray_head
    done = wb("ray", "submit", "--address", url, "--", "wb", "train", "steps=1", timeout=120,
              HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    assert done.returncode != 0
    assert "token" in (done.stdout + done.stderr).lower()


def test_ray_submit_train_kill_and_resume(ray_head, clean_ddp, tmp_path):
    url, auth = ray_head
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    done = wb("ray", "submit", "--address", url, "--working-dir", str(ROOT), "--timeout", "400", "--",
              "wb", "train", "--launcher", "ray", "--recipe", "ddp", "--nproc", "2", "--max-failures", "1",
              "--config", TINY, "--run-dir", str(run_dir), *JOB, *KILL,
              timeout=450, HOME=auth["HOME"], RAY_AUTH_MODE="token")
    seconds = time.perf_counter() - t0
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "SUCCEEDED" in out
    # quiet logs: Ray Train's per-step reports and State-API warnings are filtered in every worker, said once
    assert "Reporting training result" not in out and "Failed to query Ray Train Controller" not in out
    assert "per-step report lines and its state-API warnings are hidden" in out
    assert (run_dir / ".fault_fired").is_file()          # rank 1 really died
    assert summary(run_dir)["resumed_from_step"] == 2    # the restarted group resumed
    assert summary(run_dir)["world_size"] == 2
    assert max_rel_diff(final_params(run_dir), final_params(clean_ddp[0])) < 1e-6
    assert losses(run_dir) == pytest.approx(losses(clean_ddp[0]), rel=1e-6)
    assert list((run_dir / "ray").rglob("checkpoint_*")), "no checkpoint reached ray.train.report"
    print(f"\nray submit -> Ray Train 2 workers, kill + restart + resume: {seconds:.1f} s")
