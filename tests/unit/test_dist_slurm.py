"""``srun`` without torchrun: ranks from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, rendezvous on the node list's first
host; torchrun's variables win; a plain sbatch shell (no step) stays one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch.dist import first_host, peek_rank, read_env, slurm_rendezvous
from tests.utils.spawn import free_port

SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1"}
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def srun_env(monkeypatch):
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2)")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[007-008]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    return monkeypatch


def test_first_host_of_slurm_host_lists():
    assert first_host("localhost") == "localhost"
    assert first_host("gpu[003-005,9]-ib,cpu1") == "gpu003-ib"
    assert first_host("a,b[1-2]") == "a"
    assert first_host("node[07]") == "node07"


def test_srun_ranks_and_rendezvous(srun_env):
    assert read_env() == (1, 4, 1, 2) and peek_rank() == 1
    assert slurm_rendezvous() == f"tcp://gpu007:{20000 + 123456 % 20000}"
    srun_env.delenv("SLURM_STEP_NODELIST")
    srun_env.delenv("SLURM_JOB_NODELIST", raising=False)
    srun_env.delenv("SLURM_NODELIST", raising=False)
    srun_env.setenv("SLURM_LAUNCH_NODE_IPADDR", "10.0.0.5")
    srun_env.setenv("MASTER_PORT", "29999")
    assert slurm_rendezvous() == "tcp://10.0.0.5:29999"


def test_torchrun_wins_and_a_batch_shell_is_one_process(srun_env):
    srun_env.setenv("RANK", "3")
    srun_env.setenv("WORLD_SIZE", "8")
    assert read_env()[:2] == (3, 8) and slurm_rendezvous() is None
    for name in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        srun_env.delenv(name)
    assert read_env() == (0, 1, 0, 1) and peek_rank() == 0  # sbatch shell: SLURM_PROCID but no srun step


WORKER = """
import torch, torch.distributed as dist
from launch.dist import init_distributed, destroy
env = init_distributed("cpu", timeout=60)
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
print(env.rank, env.world_size, env.local_rank, int(t.item()), flush=True)
destroy()
"""


@pytest.mark.timeout(120)
def test_two_srun_tasks_form_a_process_group():
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith("SLURM_")}
    procs = []
    for rank in range(2):
        env = dict(base, SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_LOCALID=str(rank))
        env.update(SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-c", WORKER]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-2000:]
            outs.append(out.split())
    finally:
        for proc in procs:
            proc.kill()
    assert outs == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]
