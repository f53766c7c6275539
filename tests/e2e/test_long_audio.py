"""60 s of audio in each long-audio strategy on the tiny model: the mp4 has the audio's frame count at 25 fps and
the whole audio track; 2 ranks (windows spread over data-parallel groups) write the same frames as one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, generate, tiny_args

pytestmark = pytest.mark.slow
SECONDS = 60.0


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory):
    """60 s of real speech: the 16 s example repeated and cut."""
    wav, rate = sf.read(str(EXAMPLES / "speech_16s.wav"), dtype="float32")
    reps = int(np.ceil(SECONDS * rate / len(wav)))
    path = tmp_path_factory.mktemp("long") / "speech_60s.wav"
    sf.write(str(path), np.tile(wav, (reps,) + (1,) * (wav.ndim - 1))[: int(SECONDS * rate)], rate)
    return path


def _render(weights, out, audio, *extra, nproc=1):
    result = generate(
        *tiny_args(weights, out, audio, "sampling.steps=2", "model.image_size=64", *extra), nproc=nproc, timeout=580
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.with_name(out.name + ".json").read_text())


@pytest.fixture(scope="module")
def one_rank(tiny_weights, long_audio, tmp_path_factory):
    """The single-process render of each strategy, made once and shared by both tests: ``strategy -> (mp4, report)``."""
    folder = tmp_path_factory.mktemp("one-rank")
    done = {}

    def render(strategy):
        if strategy not in done:
            out = folder / f"{strategy}.mp4"
            done[strategy] = (out, _render(tiny_weights, out, long_audio, f"long.strategy={strategy}"))
        return done[strategy]

    return render


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["shift", "blend", "segments"])
def test_sixty_seconds_in_each_strategy(one_rank, strategy):
    from avatar.io.video import probe

    out, report = one_rank(strategy)
    info = probe(str(out))
    assert abs(info.frames - SECONDS * 25) <= 1
    assert abs(info.audio_duration - SECONDS) <= 0.1
    assert report["strategy"] == strategy
    seams = report["seams"]
    assert seams and all(s["seam_diff"] >= 0 and s["interior_median"] is not None for s in seams), seams
    if strategy == "segments":
        manifest = json.loads((out.parent / "segments.mp4.segments" / "manifest.json").read_text())
        assert manifest["complete"] and sum(s["num_frames"] for s in manifest["segments"]) == info.frames


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["blend", "segments"])
def test_two_ranks_equal_one(one_rank, tiny_weights, long_audio, tmp_path, strategy):
    from tests.utils.video import read_frames

    one, _ = one_rank(strategy)
    two = tmp_path / "two.mp4"
    report = _render(tiny_weights, two, long_audio, f"long.strategy={strategy}", "parallel.data=2", nproc=2)
    assert report["plan"]["data"] == 2
    np.testing.assert_array_equal(read_frames(str(two)), read_frames(str(one)))


@pytest.mark.timeout(300)
def test_segments_where_three_cover_a_frame_keep_the_audio_length(tiny_weights, tmp_path):
    """2.6 s (17 latents) in windows of 9 with overlap 2: the last segment, moved back to end with the audio, starts
    inside the first one, so three segments cover latent 8. Each frame is emitted once (it was 66 frames for 65)."""
    from avatar.io.video import probe
    from avatar.pipeline.windows import latents_for_frames, plan_segments
    from launch import generate as cli

    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    clip = tmp_path / "speech_2.6s.wav"
    sf.write(str(clip), wav[: int(2.6 * rate)], rate)
    plan = plan_segments(latents_for_frames(65), 9, 2)
    assert plan[-1].start < plan[-3].stop  # three segments cover one latent
    out = tmp_path / "segments.mp4"
    args = tiny_args(tiny_weights, out, clip, "sampling.steps=1", "model.image_size=64", "long.strategy=segments")
    assert cli.main([str(a) for a in args]) == 0
    assert probe(str(out)).frames == 65
