"""``tests/gpu/check.sh``: skips cleanly without a GPU; on a GPU runs every check and writes its results to $OUT."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("check.sh")


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without a GPU")
def test_check_skips_cleanly_without_a_gpu(tmp_path):
    result = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=110, env={**os.environ, "OUT": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr
    assert "gpu check: skipped" in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_runs_on_a_gpu(tmp_path):
    result = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=590, env={**os.environ, "OUT": str(tmp_path)}
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["forward"]["tflops_full"] > 0 and report["attention"]["facade_backend"] != "unknown"


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without a GPU")
def test_quality_script_skips_cleanly_without_a_gpu(tmp_path):
    result = subprocess.run(
        [str(SCRIPT.with_name("quality.sh"))],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "OUT": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "gpu quality: skipped" in result.stdout
    assert list(tmp_path.iterdir()) == []
