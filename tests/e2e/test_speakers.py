"""Several speakers end to end (``speakers=PATH.json``) on the tiny model: the README's two-person example, one
speaker bit-identical to ``audio=``, turns on one shared recording, and every bad input of the contract as one line
naming the speaker and the field, exit 2, before any model, nothing created."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from launch import generate as generate_cli
from tests.e2e.conftest import (
    EXAMPLES,
    FRONTEND_SETTINGS,
    REFERENCE_SEED,
    REFERENCE_STEPS,
    ROOT,
    env,
    generate,
)
from tests.e2e.test_bad_input import built  # noqa: F401 - the fixture that fails a test if a model is built

TWO_FACES = EXAMPLES / "two_faces.jpg"
#: The two faces of ``two_faces.jpg`` (640×320) in its pixels, for renders too small for the detector (64 px).
LEFT_BOX, RIGHT_BOX = [110, 64, 210, 164], [430, 64, 530, 164]


def _ok(result):
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _cut(path, start: float, seconds: float, rate_out: int | None = None):
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    cut = wav[int(start * rate) : int((start + seconds) * rate)]
    sf.write(str(path), cut, rate_out or rate)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speaker-clips")
    return _cut(folder / "left.wav", 0.0, 1.0), _cut(folder / "right.wav", 2.0, 0.6)


def _spec(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# --- renders ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_two_person_example(tiny_weights, tmp_path):
    """``launch.generate speakers=examples/two_speakers.json`` as the README shows: both faces found, the video as
    long as the longer track, the soundtrack mixed, both boxes in the report, no temporary left."""
    from avatar.io.video import probe

    out = tmp_path / "two.mp4"
    _ok(
        generate(
            "model=tiny",
            f"weights={tiny_weights}",
            "image=examples/two_faces.jpg",
            "speakers=examples/two_speakers.json",
            f"output={out}",
            "sampling.steps=3",
            timeout=580,
        )
    )
    report = json.loads((tmp_path / "two.mp4.json").read_text())
    left, right = report["speakers"]
    assert (left["name"], right["name"]) == ("left", "right") and left["face"] == right["face"] == "auto"
    assert left["box"][2] <= 320 <= right["box"][0]  # left to right, each on its half of the 640-px image
    assert left["mask_area"] > 0 and right["mask_area"] > 0
    assert left["seconds"] == 3.0 and right["seconds"] == 2.4
    assert 0 < left["gain"] == right["gain"] <= 1
    assert report["inputs"]["audio"] == [str(EXAMPLES / "speaker_left.wav"), str(EXAMPLES / "speaker_right.wav")]
    info = probe(str(out))
    assert info.audio_streams == 1 and info.frames == 75 and abs(info.duration - 3.0) <= 0.05
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the mix temporary is gone


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_speaker_is_bit_identical_to_audio(tiny_weights, one_second_clip, cli_reference, tmp_path):
    from tests.utils.video import read_frames

    out = tmp_path / "one.mp4"
    spec = _spec(tmp_path / "one.json", [{"audio": str(one_second_clip), "face": "auto", "name": "Eileen"}])
    _ok(
        generate(
            *FRONTEND_SETTINGS,
            f"weights={tiny_weights}",
            f"image={EXAMPLES / 'portrait.jpg'}",
            f"speakers={spec}",
            f"output={out}",
            f"seed={REFERENCE_SEED}",
            f"sampling.steps={REFERENCE_STEPS}",
        )
    )
    np.testing.assert_array_equal(read_frames(out), read_frames(cli_reference))
    report = json.loads((tmp_path / "one.mp4.json").read_text())
    assert [s["name"] for s in report["speakers"]] == ["Eileen"] and report["speakers"][0]["gain"] == 1.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_tracks_and_turns_render_and_differ(tiny_weights, clips, tmp_path):
    """Given boxes at 64 px; one track each, then the first track shared with turns: both render, and the
    second speaker's voice changes the video."""
    from tests.utils.video import read_frames

    left, right = clips
    common = ("model=tiny", "model.image_size=64", f"weights={tiny_weights}", f"image={TWO_FACES}", "sampling.steps=2")
    tracks = _spec(
        tmp_path / "tracks.json",
        [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(right), "face": RIGHT_BOX}],
    )
    turns = _spec(
        tmp_path / "turns.json",
        {
            "audio": str(left),
            "speakers": [{"face": LEFT_BOX, "turns": [[0, 0.5]]}, {"face": RIGHT_BOX, "turns": [[0.5, 1.0]]}],
        },
    )
    _ok(generate(*common, f"speakers={tracks}", f"output={tmp_path / 'tracks.mp4'}"))
    _ok(generate(*common, f"speakers={turns}", f"output={tmp_path / 'turns.mp4'}"))
    report = json.loads((tmp_path / "turns.mp4.json").read_text())
    assert [s["turns"] for s in report["speakers"]] == [[[0, 0.5]], [[0.5, 1.0]]]
    assert [s["face"] for s in report["speakers"]] == ["given", "given"]
    assert report["speakers"][0]["box"] == [float(v) for v in LEFT_BOX]
    a, b = read_frames(tmp_path / "tracks.mp4"), read_frames(tmp_path / "turns.mp4")
    assert a.shape == b.shape == (25, 64, 128, 3) and not np.array_equal(a, b)


# --- bad input ----------------------------------------------------------------------------------------------------


def _bad(capsys, tmp_path, tiny_weights, data, expect: str, image=TWO_FACES, extra=()):
    spec = _spec(tmp_path / "speakers.json", data)
    out = tmp_path / "out.mp4"
    args = ["model=tiny", f"weights={tiny_weights}", f"image={image}", f"speakers={spec}", f"output={out}", *extra]
    code = generate_cli.main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, errors
    assert expect in errors[0], errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".wav")
    )  # nothing created beside the inputs
    return errors[0]


def test_face_box_outside_the_image(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, right = clips
    data = [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(right), "face": [600, 0, 700, 50], "name": "Bo"}]
    line = _bad(capsys, tmp_path, tiny_weights, data, 'speaker 2 ("Bo") face: [600, 0, 700, 50] is outside')
    assert "640x320" in line


def test_two_speakers_on_one_face(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, right = clips
    data = [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(right), "face": [130, 80, 200, 150]}]
    _bad(capsys, tmp_path, tiny_weights, data, 'speaker 2 ("speaker 2") face: on the same face as speaker 1')


def test_more_auto_speakers_than_faces(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, right = clips
    data = [{"audio": str(p), "face": "auto"} for p in (left, right, left)]
    _bad(capsys, tmp_path, tiny_weights, data, 'speaker 3 ("speaker 3") face: "auto" but image=')


def test_empty_track(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, _ = clips
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    data = [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(empty), "face": RIGHT_BOX, "name": "Bo"}]
    _bad(capsys, tmp_path, tiny_weights, data, 'speaker 2 ("Bo") audio: ')


def test_mismatched_sample_rates(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, _ = clips
    fast = _cut(tmp_path / "fast.wav", 1.0, 1.0, rate_out=22050)
    data = [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(fast), "face": RIGHT_BOX}]
    _bad(capsys, tmp_path, tiny_weights, data, 'speaker 2 ("speaker 2") audio: ')


def test_unknown_field_and_audio_with_tracks(capsys, tmp_path, tiny_weights, clips, built):  # noqa: F811
    left, right = clips
    data = [{"audio": str(left), "face": "auto", "voice": "x"}]
    _bad(capsys, tmp_path, tiny_weights, data, 'speaker 1 ("speaker 1") voice: unknown field')
    data = [{"audio": str(left), "face": LEFT_BOX}, {"audio": str(right), "face": RIGHT_BOX}]
    _bad(capsys, tmp_path, tiny_weights, data, "audio: a shared recording is given", extra=[f"audio={left}"])


def test_bad_speakers_exit_code_is_2_in_a_real_process(tmp_path, tiny_weights, clips):
    left, _ = clips
    spec = _spec(tmp_path / "s.json", [{"audio": str(left), "face": [0, 0, 9999, 10]}])
    cmd = [sys.executable, "-m", "launch.generate", "model=tiny", f"weights={tiny_weights}", f"image={TWO_FACES}"]
    cmd += [f"speakers={spec}", f"output={tmp_path / 'o.mp4'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "face: [0, 0, 9999, 10] is outside" in result.stderr and not (tmp_path / "o.mp4").exists()
