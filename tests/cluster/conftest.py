"""``slurm_cluster``: a real single-node Slurm on localhost for the session (tests/cluster/slurm_up.sh), skipped with
the reason where it cannot be installed or started, always stopped by PID afterwards (slurm_down.sh)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass
class SlurmCluster:
    folder: Path
    env: dict

    def sbatch(self, *args: str, timeout: int = 240) -> str:
        """Submit and return the job id (``--parsable``)."""
        out = subprocess.run(
            ["sbatch", "--parsable", *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise AssertionError(f"sbatch {' '.join(args)} failed: {out.stderr.strip()}")
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 240) -> dict[str, str]:
        """Wait until nothing of ``job_id`` (every array task) is in squeue; returns {job id: exit code} from
        ``scontrol show job`` (kept for MinJobAge)."""
        deadline = time.monotonic() + timeout
        while subprocess.run(
            ["squeue", "-h", "-j", job_id], env=self.env, capture_output=True, text=True
        ).stdout.strip():
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env)
                raise AssertionError(f"Slurm job {job_id} still queued/running after {timeout} s")
            time.sleep(0.5)
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True
        ).stdout
        codes = {}
        for line in shown.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            codes[fields["JobId"]] = f"{fields.get('JobState')} {fields.get('ExitCode')}"
        return codes


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run(
            ["bash", str(HERE / "slurm_up.sh"), str(folder)], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        up = None
    if up is None or up.returncode != 0:
        subprocess.run(["bash", str(HERE / "slurm_down.sh"), str(folder)], capture_output=True, timeout=120)
        reason = "timed out after 180 s" if up is None else (up.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"no local Slurm: {reason}")
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    try:
        yield SlurmCluster(folder=folder, env=env)
    finally:
        down = subprocess.run(
            ["bash", str(HERE / "slurm_down.sh"), str(folder)], capture_output=True, text=True, timeout=120
        )
        assert down.returncode == 0, down.stderr
