"""End-to-end helpers: a runner for the real entry point as a subprocess (the tiny weights fixture is in
``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# --- one command-line render shared by the front-end tests (Python API, server) -----------------------------------

#: Settings every front-end test renders with: the tiny model at 64 px on the CPU.
FRONTEND_SETTINGS = ("model=tiny", "model.image_size=64", "device=cpu")
#: The reference job: seed and steps (enough steps that a server can be stopped in the middle of them).
REFERENCE_SEED, REFERENCE_STEPS = 5, 12


@pytest.fixture(scope="session")
def one_second_clip(tmp_path_factory) -> Path:
    """The first second of the example speech."""
    import soundfile as sf

    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("clip") / "one_second.wav"
    sf.write(str(path), wav[:rate], rate)
    return path


@pytest.fixture(scope="session")
def cli_reference(tiny_weights, one_second_clip, tmp_path_factory) -> Path:
    """``launch.generate`` of the reference job (example portrait, one second of speech); returns the mp4."""
    out = tmp_path_factory.mktemp("cli-reference") / "reference.mp4"
    result = generate(
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={one_second_clip}",
        f"output={out}",
        f"seed={REFERENCE_SEED}",
        f"sampling.steps={REFERENCE_STEPS}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out
