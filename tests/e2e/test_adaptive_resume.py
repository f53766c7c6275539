"""``sampling=fast`` (the adaptive step cache) killed with SIGKILL in the middle of its reused steps, stopped with
SIGTERM later, and rerun each time with the same command, ends with the same mp4 frames as the uninterrupted render:
the cache state rides in the step checkpoints (``checkpoint_every=1``: a checkpoint after every step, reused or not).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, generate
from tests.e2e.test_resume_exact import _checkpoint_step, _interrupt

pytestmark = pytest.mark.slow
STEPS = 30


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """1 s of speech: one window per step on the tiny model."""
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("clip") / "one_second.wav"
    sf.write(str(path), wav[:rate], rate)
    return path


def _args(weights: Path, audio: Path, out: Path) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={audio}",
        f"output={out}",
        "model.image_size=64",
        "sampling=fast",
        f"sampling.steps={STEPS}",
        "checkpoint_every=1",
    ]


@pytest.mark.timeout(600)
def test_kill_and_term_then_rerun_give_the_uninterrupted_video(tiny_weights, clip, tmp_path):
    from avatar.pipeline.state import single_state_dir
    from tests.utils.video import read_frames

    whole = tmp_path / "whole.mp4"
    result = generate(*_args(tiny_weights, clip, whole), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    denoise = json.loads(whole.with_name("whole.mp4.json").read_text())["denoise"]
    assert denoise["cache"] == "adaptive" and denoise["cached_forwards"] == 0
    steps = denoise["cache_windows"][0]["steps"]
    assert steps.count("R") >= 10, steps
    kill_at = steps.index("R", 5)  # a checkpoint whose next step reuses

    out = tmp_path / "interrupted.mp4"
    args = _args(tiny_weights, clip, out)
    code = _interrupt(args, out, signal.SIGKILL, kill_at)
    assert code != 0 and not out.exists()
    assert _checkpoint_step(out) >= kill_at
    code = _interrupt(args, out, signal.SIGTERM, 20)
    assert code == 75 and not out.exists()
    assert _checkpoint_step(out) >= 20
    result = generate(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = json.loads(out.with_name("interrupted.mp4.json").read_text())["denoise"]
    assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] >= 20
    assert not single_state_dir(out).exists()
    np.testing.assert_array_equal(read_frames(str(out)), read_frames(str(whole)))
