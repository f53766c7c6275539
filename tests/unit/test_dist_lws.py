"""A LeaderWorkerSet group without torchrun: ranks from LWS_WORKER_INDEX / LWS_GROUP_SIZE, rendezvous on
LWS_LEADER_ADDRESS; torchrun's and srun's variables win; two real processes form a gloo group from those variables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launch.dist import lws_rendezvous, peek_rank, read_env, rendezvous
from tests.unit.test_dist_slurm import TORCHRUN, WORKER
from tests.utils.spawn import free_port

LWS = {"LWS_LEADER_ADDRESS": "avatar-0.avatar.default", "LWS_GROUP_SIZE": "4", "LWS_WORKER_INDEX": "2"}


@pytest.fixture
def lws_env(monkeypatch):
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    for name, value in LWS.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_lws_ranks_and_rendezvous(lws_env):
    assert read_env() == (2, 4, 0, 1) and peek_rank() == 2
    assert lws_rendezvous() == rendezvous() == "tcp://avatar-0.avatar.default:29500"
    lws_env.setenv("MASTER_PORT", "23456")
    assert rendezvous() == "tcp://avatar-0.avatar.default:23456"
    lws_env.setenv("LWS_WORKER_INDEX", "4")
    with pytest.raises(ValueError, match="LWS_WORKER_INDEX=4 LWS_GROUP_SIZE=4"):
        read_env()


def test_torchrun_and_srun_win_over_lws(lws_env):
    lws_env.setenv("RANK", "5")
    lws_env.setenv("WORLD_SIZE", "8")  # torchrun started in the pod with --nnodes=$LWS_GROUP_SIZE ...
    assert read_env()[:2] == (5, 8) and rendezvous() is None and peek_rank() == 5
    for name in ("RANK", "WORLD_SIZE"):
        lws_env.delenv(name)
    lws_env.setenv("SLURM_PROCID", "1")
    lws_env.setenv("SLURM_NTASKS", "2")
    lws_env.setenv("SLURM_STEP_ID", "0")
    lws_env.setenv("SLURM_STEP_NODELIST", "n1")
    assert read_env()[:2] == (1, 2) and lws_rendezvous() is None and rendezvous().startswith("tcp://n1:")
    lws_env.delenv("LWS_LEADER_ADDRESS")
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEP_NODELIST"):
        lws_env.delenv(name)
    assert read_env() == (0, 1, 0, 1)  # without a leader address: one plain process


@pytest.mark.timeout(120)
def test_two_lws_pods_form_a_process_group():
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith(("SLURM_", "LWS_"))}
    procs = []
    for index in range(2):
        env = dict(base, LWS_LEADER_ADDRESS="127.0.0.1", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX=str(index))
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
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
    assert outs == [["0", "2", "0", "3"], ["1", "2", "0", "3"]]
