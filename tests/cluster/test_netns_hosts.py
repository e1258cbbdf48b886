"""Two nodes on one machine (scripts/netns_hosts.sh: network namespaces joined by a veth pair; docs/ARCHITECTURE.md,
Slurm test cluster): `wb launch torchrun --nnodes 2` with one rank per "host", c10d on host A's address, matches
`single` per step and in its final parameters. Skipped with the script's one-line reason where namespaces cannot
be made (not root, no `ip`, no netns or veth)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster.common import ROOT, TINY, env, final_params, free_port, losses, max_rel_diff, wb

SCRIPT = str(ROOT / "scripts" / "netns_hosts.sh")
HOSTS = {"wb-hostA": ("10.77.0.1", "wbvA"), "wb-hostB": ("10.77.0.2", "wbvB")}
STEPS = ["steps=6", "progress=false", "checkpoint.every=0", "checkpoint.save_final=true"]


@pytest.fixture(scope="module")
def hosts():
    done = subprocess.run(["bash", SCRIPT, "up"], capture_output=True, text=True, timeout=60)
    if done.returncode == 3:
        reason = done.stderr.strip().splitlines() or ["exit 3: it cannot run here"]
        pytest.skip(reason[-1])   # the script's one-line reason (not root, no apt-get / ip)
    assert done.returncode == 0, done.stdout + done.stderr
    yield HOSTS
    subprocess.run(["bash", SCRIPT, "down"], capture_output=True, timeout=60)


def test_two_node_torchrun_matches_single(hosts, tmp_path):
    ref = tmp_path / "single"
    done = wb("train", "--recipe", "single", "--config", TINY, "--run-dir", str(ref), *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir, port = tmp_path / "two-nodes", free_port()
    head = hosts["wb-hostA"][0]
    procs = []
    for ns, (addr, dev) in hosts.items():
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "workbench", "launch", "torchrun", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-endpoint", f"{head}:{port}", "--rdzv-id", "netns",
               "--local-addr", addr, "--rdzv-conf", f"is_host={'true' if addr == head else 'false'}",
               "--", "wb", "train", "--recipe", "ddp", "--config", TINY, "--run-dir", str(run_dir), *STEPS]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(GLOO_SOCKET_IFNAME=dev), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    got, want = losses(run_dir), losses(ref)
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=1e-5)
    assert max_rel_diff(final_params(run_dir), final_params(ref)) < 1e-5
