"""Two nodes on one machine (scripts/netns_hosts.sh: network namespaces joined by a veth pair; docs/ARCHITECTURE.md,
Slurm test cluster), one rank per "host", every run compared with one `single` run (6 steps, checkpoints every 2):

- each host's gloo interface is the one carrying its address (cluster/netif.py), chosen inside the namespace;
- `wb launch torchrun --nnodes 2` (c10d on host A), host B's rank killed at step 3 (`fault.kill_rank=1`: c10d
  orders nodes by address, so rank 1 is host B's): both agents (`--max-restarts 1`) restart, the group resumes
  from step 2, and every step's loss (from the first attempt or the restarted one, all two-node) and the final
  parameters match `single`;
- `wb slurm render --nodes 2 --nproc-per-node 1 --submit --wait`, run in host A, on a two-node Slurm (slurmctld
  and slurmd hostA in host A, slurmd hostB in host B: scripts/slurm_hosts.sh) matches `single`;
- `wb train --launcher ray --nproc 1:2` (elastic), driver in host A, on a Ray head in host A and a Ray worker
  node in host B (`netns_hosts.sh ray-up`, one CPU each, so one Ray Train worker per host) starts on both hosts;
  host B is then lost for good (every process in it killed) and the survivor resumes resharded on 1 worker,
  matching `single`; `ray-down` leaves no process in either namespace (it runs last: an idle Ray slows the
  other runs down, and host B's Ray node is gone).

GLOO_SOCKET_IFNAME is never set here: the launchers pick it per node. WB_NETNS_SUFFIX names a separate pair (the
names are machine-wide). Skipped with the script's one-line reason where namespaces cannot be made (not root, no
`ip`, no netns or veth); the Slurm test also where its packages are missing and there is no apt-get."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.cluster import common
from tests.cluster.common import JOB, ROOT, TINY, final_params, losses, max_rel_diff, summary, wb

pytestmark = pytest.mark.slow

SCRIPT = str(ROOT / "scripts" / "netns_hosts.sh")
SLURM_SCRIPT = str(ROOT / "scripts" / "slurm_hosts.sh")
SFX = os.environ.get("WB_NETNS_SUFFIX", "")
HOSTS = {f"wb-hostA{SFX}": ("10.77.0.1", f"wbvA{SFX}"), f"wb-hostB{SFX}": ("10.77.0.2", f"wbvB{SFX}")}
HEAD_NS, WORKER_NS = HOSTS
RAY_TOKEN = f"/tmp/wb-netns-ray{SFX}/auth_token"


def script(*args: str, timeout: float = 120, path: str = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=timeout,
                          env=common.env(RAY=f"{common.VENV_BIN}/ray"))


def skip_if_cannot(done: subprocess.CompletedProcess) -> None:
    if done.returncode == 3:
        reason = done.stderr.strip().splitlines() or ["exit 3: it cannot run here"]
        pytest.skip(reason[-1])   # the script's one-line reason (not root, no ip / netns / veth / apt-get)
    assert done.returncode == 0, done.stdout + done.stderr


def host_env(**extra: str) -> dict[str, str]:
    e = common.env(**extra)
    e.pop("GLOO_SOCKET_IFNAME", None)   # the launchers must choose it per node
    return e


def in_host(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, *args]


def namespace_pids() -> list[str]:
    return [pid for ns in HOSTS for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                          text=True).stdout.split()]


@pytest.fixture(scope="module")
def hosts():
    skip_if_cannot(script("up", timeout=60))
    yield HOSTS
    script("down", timeout=60)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    ref = tmp_path_factory.mktemp("single") / "run"
    done = wb("train", "--recipe", "single", "--config", TINY, "--run-dir", str(ref), *JOB)
    assert done.returncode == 0, done.stderr[-3000:]
    return ref


def assert_matches_single(run_dir, ref) -> None:
    got, want = losses(run_dir), losses(ref)
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-5)
    assert max_rel_diff(final_params(run_dir), final_params(ref)) < 1e-5


def test_gloo_interface_is_chosen_per_host(hosts):
    for ns, (addr, dev) in hosts.items():
        code = f"from gpu_workbench.cluster import netif; print(netif.interface_of('{addr}'))"
        done = subprocess.run(in_host(ns, "-c", code),
                              cwd=ROOT, env=host_env(), capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == dev, done.stderr[-2000:]


def two_node_torchrun(hosts, run_dir, *extra: str, restarts: int = 0) -> list[str]:
    """One `wb launch torchrun` agent per host, one rank each; their outputs (host A's, host B's). Outputs go to
    files, not pipes: a pipe read only after the other agent ends could fill and stall its ranks."""
    port, head, procs, logs = common.free_port(), hosts[HEAD_NS][0], [], []
    for ns, (addr, _) in hosts.items():
        cmd = in_host(ns, "-m", "gpu_workbench", "launch", "torchrun", "--nnodes", "2", "--nproc-per-node", "1",
                      "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", "netns", "--local-addr", addr,
                      "--rdzv-conf", f"is_host={'true' if addr == head else 'false'}", "--max-restarts",
                      str(restarts), "--", "wb", "train", "--recipe", "ddp", "--config", TINY, "--run-dir",
                      str(run_dir), *JOB, *extra)
        logs.append(run_dir.parent / f"{ns}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=host_env(), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
        for p in procs:   # the agent and its ranks: the session each agent leads
            os.killpg(p.pid, signal.SIGKILL)
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(o[-4000:] for o in outs)
    return outs


def test_two_node_torchrun_matches_single_and_survives_losing_host_b(hosts, single, tmp_path):
    run_dir = tmp_path / "run"
    out_a, out_b = two_node_torchrun(hosts, run_dir, "fault.kill_rank=1", "fault.at_step=3", restarts=1)
    assert "exitcode: 17" in out_b and "exitcode: 17" not in out_a   # the death was host B's rank
    assert (run_dir / ".fault_fired").read_text().startswith("rank 1 killed at step 3")
    assert summary(run_dir)["resumed_from_step"] == 2
    assert_matches_single(run_dir, single)


@pytest.fixture(scope="module")
def slurm_hosts(hosts):
    """The two-node Slurm up (its packages installed if missing): SLURM_CONF for clients in host A."""
    done = script("up", timeout=900, path=SLURM_SCRIPT)
    skip_if_cannot(done)
    yield re.search(r"SLURM_CONF=(\S+)", done.stdout).group(1)
    script("down", path=SLURM_SCRIPT)


@pytest.mark.slurm
def test_two_node_slurm_job_matches_single(slurm_hosts, single, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(in_host(HEAD_NS, "-m", "gpu_workbench", "slurm", "render", "--nodes", "2", "--nproc-per-node",
                                  "1", "--gpus-per-node", "0", "--partition", "debug", "--time", "10", "--port",
                                  str(common.free_port()), "--log-dir", str(tmp_path / "logs"), "--submit", "--wait",
                                  "--", "wb", "train", "--recipe", "ddp", "--config", TINY, "--run-dir", str(run_dir),
                                  *JOB),
                          cwd=ROOT, env=host_env(SLURM_CONF=slurm_hosts), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr + "".join(
        p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.out"))
    start = json.loads((run_dir / "slurm_env.json").read_text())["starts"][0]
    assert start["hostnames"] == ["hostA", "hostB"] and start["env"]["SLURM_JOB_NUM_NODES"] == "2"
    assert summary(run_dir)["world_size"] == 2
    assert_matches_single(run_dir, single)


@pytest.fixture(scope="module")
def ray_hosts(hosts):
    done = script("ray-up")
    assert done.returncode == 0, done.stdout + done.stderr
    yield f"{hosts[HEAD_NS][0]}:6379"
    done = script("ray-down")
    assert done.returncode == 0 and namespace_pids() == [], done.stdout + done.stderr


def wait_for_checkpoint(run_dir, driver: subprocess.Popen, log, timeout: float = 240) -> None:
    """Until the run's first complete checkpoint; the deadline only ends a hang (a busy box is slow)."""
    from gpu_workbench.parallel.checkpoint import complete_checkpoints

    deadline = time.monotonic() + timeout
    while not complete_checkpoints(run_dir):
        assert driver.poll() is None, "the Ray driver exited before its first checkpoint:\n" + log.read_text()[-6000:]
        assert time.monotonic() < deadline, f"no complete checkpoint after {timeout} s:\n" + log.read_text()[-6000:]
        time.sleep(0.2)


def kill_host(ns: str, timeout: float = 10) -> None:
    """Host B gone for good: every process in its namespace (its raylet, its Ray Train worker), SIGKILLed,
    again until none is left (one may have been forked after the list was read)."""
    deadline = time.monotonic() + timeout
    while pids := subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, f"processes left in {ns}: {pids}"
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def test_elastic_two_host_ray_train_loses_host_b_and_finishes_on_one_worker(ray_hosts, single, tmp_path):
    """`--nproc 1:2` starts on both hosts; rank 1 (host B's) hangs at step 3, so the checkpoint after step 2 is
    the newest when every process of host B is killed (last in this module: host B's Ray node does not come
    back). The first restart asks for 2 workers (host B is not yet marked dead) and times out after
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's default 60 s, 15 here); the next has 1 and resumes."""
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    env = host_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=RAY_TOKEN, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="15")
    with open(log, "w") as out:
        driver = subprocess.Popen(in_host(HEAD_NS, "-m", "gpu_workbench", "train", "--launcher", "ray", "--ray-address",
                                          ray_hosts, "--nproc", "1:2", "--max-failures", "1", "--recipe", "ddp",
                                          "--config", TINY, "--run-dir", str(run_dir), *JOB, "fault.hang_rank=1",
                                          "fault.at_step=3"),
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_checkpoint(run_dir, driver, log)
        kill_host(WORKER_NS)
        code = driver.wait(timeout=240)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 0, text[-6000:]
    assert "ip=10.77.0.2" in text    # a Ray Train worker ran on host B (its log lines carry the node's address)
    assert "resuming step_000002 written by ddp on 2 ranks as ddp on 1 rank: resharding" in text, text[-3000:]
    assert "ddp x1: 6 steps" in text
    result = summary(run_dir)
    assert result["world_size"] == 1 and result["resumed_from_step"] == 2
    assert_matches_single(run_dir, single)
