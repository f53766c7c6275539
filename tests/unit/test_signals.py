"""Preemption flag: a real SIGTERM/SIGUSR1 to this process sets it, and the renderer's ``Resume.stop_requested``
agrees on it over the ranks."""

from __future__ import annotations

import os
import signal

import pytest

from avatar.pipeline.resume import Resume
from avatar.pipeline.topology import Topology
from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption, requeue_if_slurm


def _resume(topo, handler) -> Resume:
    """The renderer's agreement on a stop (no state store, no cache)."""
    return Resume(topo, None, None, "shift", handler, frozenset(), total_steps=10, every=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_signal_sets_flag_and_handler_is_restored(signum):
    before = signal.getsignal(signum)
    with PreemptionHandler() as handler:
        resume = _resume(Topology(), handler)
        assert not resume.stop_requested()
        os.kill(os.getpid(), signum)
        assert handler.requested and handler.received == signum
        assert resume.stop_requested() and resume.stop_requested()
    assert signal.getsignal(signum) == before


def test_exit_code_is_ex_tempfail():
    assert EXIT_PREEMPTED == 75


def test_requeue_outside_slurm_does_nothing(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_if_slurm() is False
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("AVATAR_SLURM_REQUEUE", "0")
    assert requeue_if_slurm() is False


def test_preemption_marker_is_written_only_when_asked(monkeypatch, tmp_path):
    marker = tmp_path / "preempted"
    monkeypatch.delenv("AVATAR_PREEMPT_MARKER", raising=False)
    record_preemption()
    assert not marker.exists()
    monkeypatch.setenv("AVATAR_PREEMPT_MARKER", str(marker))
    record_preemption()
    assert marker.exists()


def _agree_worker(rank: int, port: int, results) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    with PreemptionHandler() as handler:
        resume = _resume(Topology(rank=rank, world=2), handler)
        first = resume.stop_requested()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        dist.barrier()
        results.put((rank, first, handler.requested, resume.stop_requested()))
    dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_ranks_agree_when_only_one_was_signalled():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_agree_worker, args=(port, results), nprocs=2, start_method="spawn", join=True)
    got = sorted(results.get() for _ in range(2))
    assert got == [(0, False, False, True), (1, False, True, True)]


# --- issue 22: Ctrl-C is a checkpoint, a second Ctrl-C stops at once ------------------------------------------------


def test_sigint_sets_the_flag_and_exit_code_130(capfd):
    from launch.signals import EXIT_INTERRUPTED

    with PreemptionHandler() as handler:
        resume = _resume(Topology(), handler)
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested and handler.interrupted and resume.stop_requested()
        assert handler.exit_code == EXIT_INTERRUPTED == 130
    assert "Ctrl-C: finishing the current step" in capfd.readouterr().err
    with PreemptionHandler() as handler:
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and not handler.interrupted and handler.exit_code == EXIT_PREEMPTED


_TWICE = """
import os, signal, sys, time
from launch.signals import PreemptionHandler
handler = PreemptionHandler(repeat_window=float(sys.argv[1])).install()
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.05)
print("still running", handler.requested, flush=True)
"""


@pytest.mark.timeout(60)
def test_second_sigint_exits_at_once_without_traceback():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = [sys.executable, "-c", _TWICE]
    env = {**os.environ, "PYTHONPATH": str(root)}
    twice = subprocess.run([*run, "0"], capture_output=True, text=True, timeout=30, env=env, cwd=root)
    assert twice.returncode == 130 and "still running" not in twice.stdout
    assert "interrupted again: stopped at once" in twice.stderr and "Traceback" not in twice.stderr
    # under torchrun the agent forwards the terminal's Ctrl-C: a repeat within the window is the same one
    forwarded = subprocess.run([*run, "5"], capture_output=True, text=True, timeout=30, env=env, cwd=root)
    assert forwarded.returncode == 0 and "still running True" in forwarded.stdout, forwarded.stderr
