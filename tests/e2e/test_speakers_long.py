"""Two speakers over 40 s in ``long.strategy=segments`` on the tiny model (64 px, given boxes): 2 ranks write the
frames of one process, and a render SIGKILLed after its first finished segments, run again with the same command,
ends with the uninterrupted frames (the speakers' tracks, faces and masks are part of the resume key)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, ROOT, env, generate

pytestmark = pytest.mark.slow
SECONDS = 40.0
LEFT_BOX, RIGHT_BOX = [110, 64, 210, 164], [430, 64, 530, 164]  # the faces of examples/two_faces.jpg


@pytest.fixture(scope="module")
def speakers_json(tmp_path_factory):
    """Left: 40 s of speech; right: 25 s from another offset (padded with silence to 40 s)."""
    folder = tmp_path_factory.mktemp("long-speakers")
    wav, rate = sf.read(str(EXAMPLES / "speech_16s.wav"), dtype="float32")
    tiled = np.tile(wav, 4)
    sf.write(str(folder / "left.wav"), tiled[: int(SECONDS * rate)], rate)
    sf.write(str(folder / "right.wav"), tiled[int(7 * rate) : int(32 * rate)], rate)
    spec = [{"audio": "left.wav", "face": LEFT_BOX}, {"audio": "right.wav", "face": RIGHT_BOX}]
    (folder / "speakers.json").write_text(json.dumps(spec))
    return folder / "speakers.json"


def _args(weights, speakers, out) -> list[str]:
    return [
        "model=tiny",
        "model.image_size=64",
        f"weights={weights}",
        f"image={EXAMPLES / 'two_faces.jpg'}",
        f"speakers={speakers}",
        f"output={out}",
        "long.strategy=segments",
        "sampling.steps=2",
    ]


def _finished_segments(out) -> int:
    from avatar.pipeline.state import StateStore, single_state_dir

    folder = single_state_dir(out)
    jobs = folder / "jobs"
    if not jobs.is_dir():
        return 0
    return max([len(StateStore(folder).finished_segments(d.name)) for d in jobs.iterdir()] + [0])


@pytest.mark.timeout(1800)
def test_two_speakers_in_segments_on_two_ranks_and_after_sigkill_equal_one_process(
    tiny_weights, speakers_json, tmp_path
):
    from tests.utils.video import read_frames

    whole = tmp_path / "whole.mp4"
    result = generate(*_args(tiny_weights, speakers_json, whole), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "whole.mp4.json").read_text())
    assert report["strategy"] == "segments" and len(report["speakers"]) == 2
    assert report["num_frames"] == SECONDS * 25 and report["speakers"][1]["seconds"] == 25.0
    frames = read_frames(whole)
    assert len(frames) == SECONDS * 25

    two = tmp_path / "two.mp4"
    result = generate(*_args(tiny_weights, speakers_json, two), nproc=2, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    np.testing.assert_array_equal(read_frames(two), frames)

    out = tmp_path / "killed.mp4"
    args = _args(tiny_weights, speakers_json, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.generate", *args],
        cwd=ROOT,
        env=env(),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while _finished_segments(out) < 2:
            assert proc.poll() is None, "the render ended before two segments were stored"
            assert time.monotonic() < deadline, "no finished segment in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    result = generate(*args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "finished before, kept" in result.stderr
    np.testing.assert_array_equal(read_frames(out), frames)
