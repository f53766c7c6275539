"""The memory pre-flight on 2 gloo ranks: a device-memory provider reporting too little free memory
(``AVATAR_DEVICE_FREE_GB``, read by ``launch/dist.py``) stops both ranks with the one-line reason and exit 2 before
any weight is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, env, tiny_args


@pytest.mark.timeout(240)
def test_too_little_free_memory_stops_every_rank_before_any_weight(tiny_weights, tmp_path):
    out = tmp_path / "never.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    cmd += ["launch.generate", *tiny_args(tiny_weights, out)]
    result = subprocess.run(
        cmd, cwd=ROOT, env={**env(), "AVATAR_DEVICE_FREE_GB": "0.001"}, capture_output=True, text=True, timeout=220
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: pre-flight")]
    assert len(errors) == 2, log[-3000:]  # one line from each rank
    assert "free memory from the device-memory provider" in errors[0] and "no memory mode fits 128x128" in errors[0]
    assert "would fit: a GPU with ≥ " in errors[0]
    assert log.count("exitcode  : 2") >= 1 and "exitcode  : 1" not in log  # both ranks exit 2
    assert "loaded DiT" not in log and not out.exists()
