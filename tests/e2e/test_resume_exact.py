"""A 50-step render with every default on (deep cache, ``fidelity=official``) interrupted six times — SIGKILL and
SIGTERM, each at three different steps, one of each inside the cached phase (steps 16–19) — and rerun each time
with the same command, ends with the same mp4 frames as the uninterrupted render.

The deep cache is written only on the full steps a cached step follows and checkpoints are taken only where the
next step is a full one, so a resumed run recomputes exactly what the uninterrupted run had in memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, ROOT, env, generate

pytestmark = pytest.mark.slow
STEPS = 50


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """2 s of speech: two circular windows per step on the tiny model."""
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("clip") / "two_seconds.wav"
    sf.write(str(path), wav[: 2 * rate], rate)
    return path


def _args(weights: Path, audio: Path, out: Path) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={audio}",
        f"output={out}",
        "model.image_size=64",
        f"sampling.steps={STEPS}",
        "checkpoint_every=1",
    ]


def _checkpoint_step(out: Path) -> int:
    from avatar.pipeline.state import StateStore, single_state_dir

    folder = single_state_dir(out)
    for ckpt in (folder / "jobs").glob("*/checkpoint.pt") if (folder / "jobs").exists() else []:
        try:
            loaded = StateStore(folder).load_checkpoint(ckpt.parent.name)
        except Exception:  # noqa: BLE001 - replaced while we read it: poll again
            continue
        if loaded is not None:
            return loaded[0]
    return 0


def _interrupt(args: list[str], out: Path, signum: int, after_step: int | None) -> int:
    """Start the render; once its checkpoint reaches ``after_step`` (None: as soon as denoising starts) send
    ``signum``. Returns the exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.generate", *args], cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True
    )
    try:
        if after_step is None:
            for line in proc.stderr:
                if "denoising" in line:
                    break
        else:
            deadline = time.monotonic() + 240
            while _checkpoint_step(out) < after_step:
                assert proc.poll() is None, f"the render ended before step {after_step}"
                assert time.monotonic() < deadline, f"no checkpoint at step {after_step}"
                time.sleep(0.02)
        proc.send_signal(signum)
        proc.stderr.read()
        return proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(900)
def test_kills_and_terms_at_six_steps_then_rerun_give_the_uninterrupted_video(tiny_weights, clip, tmp_path):
    from avatar.pipeline.state import single_state_dir
    from tests.utils.video import read_frames

    whole = tmp_path / "whole.mp4"
    result = generate(*_args(tiny_weights, clip, whole), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(whole.with_name("whole.mp4.json").read_text())
    assert report["denoise"]["cache"] == "official" and report["denoise"]["cached_window_calls"] == 20 * 2

    out = tmp_path / "interrupted.mp4"
    args = _args(tiny_weights, clip, out)
    # (signal, checkpoint step to wait for, expected checkpoint after a SIGTERM): SIGKILL mid-step, SIGTERM at the
    # next boundary. The third pair: the kill right after the step-15 checkpoint (during the full step that writes
    # the cache), then the term as soon as the rerun (from 15) denoises, which lands in the cached steps 16–19 where
    # no checkpoint can be taken: it must wait for step 20.
    plan = [
        (signal.SIGKILL, 4, None),
        (signal.SIGTERM, 9, None),
        (signal.SIGKILL, 15, None),
        (signal.SIGTERM, None, 20),
        (signal.SIGKILL, 41, None),
        (signal.SIGTERM, 44, None),
    ]
    for signum, step, expected in plan:
        before = _checkpoint_step(out)
        code = _interrupt(args, out, signum, step)
        after = _checkpoint_step(out)
        assert not out.exists(), f"an output appeared after {signum.name}"
        if signum == signal.SIGTERM:
            assert code == 75, code
            assert after > before, (before, after)
            if expected is not None:
                assert (before, after) == (15, expected)
        else:
            assert code != 0
    assert _checkpoint_step(out) >= 44
    result = generate(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = json.loads(out.with_name("interrupted.mp4.json").read_text())["denoise"]["resumed_from_step"]
    assert resumed is not None and resumed >= 44
    assert not single_state_dir(out).exists()
    np.testing.assert_array_equal(read_frames(str(out)), read_frames(str(whole)))
