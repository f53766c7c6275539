"""End-to-end helpers: a runner for the real entry point as a subprocess (the tiny weights fixture is in
``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def env() -> dict:
    out = dict(os.environ)
    out.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return out


def generate(*args: str, timeout: int = 300, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ``python -m launch.generate`` (or torchrun with ``nproc`` ranks) and return the finished process."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.generate", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "launch.generate",
            *args,
        ]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def tiny_args(weights: Path, output: Path, audio: Path | None = None, *extra: str) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={audio or EXAMPLES / 'speech_5s.wav'}",
        f"output={output}",
        "sampling.steps=3",
        *extra,
    ]
