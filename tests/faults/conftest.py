"""Fault-injection helpers: real ``launch.generate`` processes (1 or 2 ranks) on a 1.2 s clip with the tiny model
and 3 steps, killed or disturbed at chosen points. ``FAULT_SEED=N`` replays the random kill points of a failed run
(every test prints the seed it used)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, ROOT, env

#: The issue-12 prompt: commas, quotes, an apostrophe, ``${...}``, a colon and non-ASCII, kept literally.
PROMPT = 'A woman, smiling, says: "it\'s ${HOME}" — 你好'
STEPS = 3
#: Log lines at which a kill can land (stages of one render, in order).
MARKERS = ("loaded DiT", "audio features", "denoising", "decode:", "mux:")


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    import soundfile as sf

    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"))
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(str(path), wav[int(0.5 * rate) : int(1.7 * rate)], rate)
    return path


@pytest.fixture
def rng(request) -> random.Random:
    seed = int(os.environ.get("FAULT_SEED") or time.time_ns() % 1_000_000)
    print(f"FAULT_SEED={seed} ({request.node.name})")
    return random.Random(seed)


def single_args(weights, clip, output, *extra) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={clip}",
        f"prompt={PROMPT}",
        f"output={output}",
        f"sampling.steps={STEPS}",
        "checkpoint_every=1",
        *extra,
    ]


def start(args, nproc: int = 1) -> subprocess.Popen:
    """A launch in its own session (so a kill reaches every rank, like a node failure)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "launch.generate", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "launch.generate", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def run(args, nproc: int = 1, timeout: float = 120) -> tuple[int, str]:
    return finish(start(args, nproc), timeout)


def signal_at(proc: subprocess.Popen, marker: str, delay: float, sig=signal.SIGKILL) -> tuple[int, str]:
    """Send ``sig`` to the launch's whole session ``delay`` s after ``marker`` appears in its log; returns the exit
    code and the log. A launch that ends first is left alone."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            break
    code, rest = finish(proc)
    return code, "".join(seen) + (rest or "")


def frames(path) -> np.ndarray:
    from tests.utils.video import read_frames

    return read_frames(path)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def hidden_leftovers(folder: Path, name: str) -> list[str]:
    """Temporaries of ``name`` still in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))
