"""Every bad input ends before any model is built: one-line error naming the file or value, exit code 2, nothing at
the output path. Runs `launch.generate.main` in-process (one subprocess case checks the real exit status)."""

from __future__ import annotations

import shutil
import wave

import numpy as np
import pytest
from PIL import Image

from launch import generate
from tests.e2e.conftest import EXAMPLES, tiny_args
from tests.e2e.conftest import generate as run_generate


@pytest.fixture
def built(monkeypatch):
    """Fails the test if any model class gets built."""
    import avatar.pipeline.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(run, "Renderer", refuse)


def _run(capsys, args):
    code = generate.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


def _write_wav(path, samples: np.ndarray, rate: int = 16000):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())


def _check(capsys, tmp_path, tiny_weights, expect: str, *, image=None, audio=None, output=None, extra=()):
    out = output or tmp_path / "out.mp4"
    args = tiny_args(tiny_weights, out, audio, *extra)
    if image is not None:
        args = [a for a in args if not a.startswith("image=")] + [f"image={image}"]
    code, errors = _run(capsys, args)
    assert code == 2
    assert len(errors) == 1, errors
    assert expect in errors[0], errors[0]
    assert not out.exists()
    assert not list(tmp_path.glob("*.mp4*"))
    return errors[0]


def test_missing_image(capsys, tmp_path, tiny_weights, built):
    msg = _check(capsys, tmp_path, tiny_weights, "nothere.jpg", image=tmp_path / "nothere.jpg")
    assert "not" in msg.lower() or "missing" in msg.lower()


def test_not_an_image(capsys, tmp_path, tiny_weights, built):
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text, not a picture")
    _check(capsys, tmp_path, tiny_weights, "fake.jpg", image=fake)


def test_image_too_small(capsys, tmp_path, tiny_weights, built):
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 200), "red").save(small)
    msg = _check(capsys, tmp_path, tiny_weights, "small.png", image=small)
    assert "64" in msg


def test_missing_audio(capsys, tmp_path, tiny_weights, built):
    _check(capsys, tmp_path, tiny_weights, "nothere.wav", audio=tmp_path / "nothere.wav")


def test_not_audio(capsys, tmp_path, tiny_weights, built):
    fake = tmp_path / "fake.wav"
    shutil.copy(EXAMPLES / "portrait.jpg", fake)
    _check(capsys, tmp_path, tiny_weights, "fake.wav", audio=fake)


def test_empty_audio(capsys, tmp_path, tiny_weights, built):
    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros(0, dtype=np.float32))
    _check(capsys, tmp_path, tiny_weights, "empty.wav", audio=empty)


def test_audio_too_long(capsys, tmp_path, tiny_weights, built):
    msg = _check(capsys, tmp_path, tiny_weights, "speech_5s.wav", extra=("audio.max_seconds=2",))
    assert "2" in msg


def test_unknown_model(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["model=huge"])
    assert code == 2 and "model" in errors[0] and "tiny" in errors[0]


def test_weights_missing(capsys, tmp_path, tiny_weights, built):
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("weights=")]
    code, errors = _run(capsys, args + [f"weights={tmp_path / 'noweights'}"])
    assert code == 2 and "noweights" in errors[0]


def test_weights_not_matching(capsys, tmp_path, tiny_weights, built):
    # the tiny folder does not hold the full-size model
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("model=")]
    code, errors = _run(capsys, ["model=hunyuan_avatar", *args])
    assert code == 2 and "does not match" in errors[0]
    assert not (tmp_path / "o.mp4").exists()


def test_output_folder_missing(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / "no" / "such" / "dir" / "o.mp4"
    _check(capsys, tmp_path, tiny_weights, "no/such/dir", output=out)


def test_output_not_writable(capsys, tmp_path, tiny_weights, built):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("running as root: a read-only folder is still writable here")
        except PermissionError:
            pass
        _check(capsys, tmp_path, tiny_weights, "ro", output=folder / "o.mp4")
    finally:
        folder.chmod(0o700)


def test_existing_output_not_overwritten(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    code, errors = _run(capsys, tiny_args(tiny_weights, out))
    assert code == 2 and "overwrite=true" in errors[0]
    assert out.read_bytes() == b"keep me"


def test_steps_below_one(capsys, tmp_path, tiny_weights, built):
    _check(capsys, tmp_path, tiny_weights, "steps", extra=("sampling.steps=0",))


def test_config_typo_and_type(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["sampling.stepz=3"])
    assert code == 2 and "sampling.stepz" in errors[0]
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["seed=abc"])
    assert code == 2 and "seed" in errors[0]


@pytest.mark.timeout(120)
def test_exit_status_of_the_real_process(tmp_path, tiny_weights):
    out = tmp_path / "o.mp4"
    proc = run_generate(*tiny_args(tiny_weights, out, tmp_path / "missing.wav"))
    assert proc.returncode == 2, proc.stderr
    assert "missing.wav" in proc.stderr
    assert not out.exists()


def test_invalid_parallel_plan(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["parallel.ulysses=2"])
    assert code == 2 and "ulysses" in errors[0] and "world" in errors[0] and "4" in errors[0]
    assert not (tmp_path / "o.mp4").exists()
