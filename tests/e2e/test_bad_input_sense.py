"""Issue 22 bad inputs on the real entry point: refused in one line with exit code 2 before any model is built,
nothing created: out-of-range audio samples, a sample rate below speech, a truncated WAV, an extreme aspect ratio, a
missing or broken ffmpeg, strict manifests (unknown CSV column, JSON null), ``<output>.state`` as a regular file."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.e2e.conftest import EXAMPLES, ROOT, env, tiny_args
from tests.e2e.test_bad_input import _batch_args, _manifest, _one_line


@pytest.fixture
def built(monkeypatch):
    """Fails the test if the renderer (any model) gets built."""
    import avatar.pipeline.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(run, "Renderer", refuse)


def _tone(path, peak: float, rate: int = 16000, seconds: float = 1.0, subtype: str = "FLOAT"):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (peak * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, subtype=subtype)
    return path


def _single(tiny_weights, tmp_path, audio=None, image=None, *extra):
    out = tmp_path / "o.mp4"
    args = tiny_args(tiny_weights, out, audio, *extra)
    if image is not None:
        args = [a for a in args if not a.startswith("image=")] + [f"image={image}"]
    return args, out


def test_absurd_float_audio(capsys, tmp_path, tiny_weights, built):
    args, out = _single(tiny_weights, tmp_path, _tone(tmp_path / "loud.wav", 1e30))
    _one_line(capsys, args, ["loud.wav", "samples reach 1e+30"], [out])


def test_audio_sample_rate_below_speech(capsys, tmp_path, tiny_weights, built):
    args, out = _single(tiny_weights, tmp_path, _tone(tmp_path / "coarse.wav", 0.5, 4000, subtype="PCM_16"))
    _one_line(capsys, args, ["coarse.wav", "4000 Hz", "8000 Hz"], [out])


def test_truncated_wav(capsys, tmp_path, tiny_weights, built):
    full = _tone(tmp_path / "full.wav", 0.5, seconds=4.0, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + 2 * 2 * 16000])
    args, out = _single(tiny_weights, tmp_path, cut)
    _one_line(capsys, args, ["cut.wav", "decodes to 2.00 s", "declares 4.00 s", "allow_damaged"], [out])


def test_extreme_aspect_ratio(capsys, tmp_path, tiny_weights, built):
    strip = tmp_path / "strip.png"
    Image.open(EXAMPLES / "portrait.jpg").convert("RGB").resize((80, 800)).save(strip)
    args, out = _single(tiny_weights, tmp_path, None, strip)
    _one_line(capsys, args, ["strip.png", "80x800", "10.0:1", "4:1"], [out])


def _broken_ffmpeg(tmp_path):
    script = tmp_path / "ffmpeg-broken"
    script.write_text("#!/bin/sh\necho 'libavcodec.so.61: cannot open shared object file' >&2\nexit 127\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize("kind", ["missing", "broken"])
def test_ffmpeg_missing_or_broken(capsys, tmp_path, tiny_weights, built, monkeypatch, kind):
    exe = tmp_path / "no-ffmpeg" if kind == "missing" else _broken_ffmpeg(tmp_path)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))
    args, out = _single(tiny_weights, tmp_path)
    expect = ["no such file"] if kind == "missing" else ["exits with 127", "cannot open shared object"]
    _one_line(capsys, args, [f"IMAGEIO_FFMPEG_EXE={exe}", *expect], [out])


def test_ffmpeg_broken_exit_status_of_the_real_process(tmp_path, tiny_weights):
    out = tmp_path / "o.mp4"
    run_env = {**env(), "IMAGEIO_FFMPEG_EXE": str(_broken_ffmpeg(tmp_path))}
    result = subprocess.run(
        [sys.executable, "-m", "launch.generate", *tiny_args(tiny_weights, out)],
        cwd=ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "IMAGEIO_FFMPEG_EXE" in errors[0] and not out.exists()


def test_manifest_unknown_csv_column(capsys, tmp_path, tiny_weights, built):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    manifest = tmp_path / "rows.csv"
    manifest.write_text("videoid,image,audio,prompt,fps,colour\na,img.jpg,a.wav,hi,25,red\n")
    out_dir = tmp_path / "out"
    _one_line(
        capsys,
        _batch_args(tiny_weights, manifest, out_dir),
        ["unknown column(s) 'colour'", "videoid, image, audio, prompt, fps", "seed, steps, strategy"],
        [out_dir],
    )


def test_manifest_json_null(capsys, tmp_path, tiny_weights, built):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(json.dumps({"videoid": None, "image": "img.jpg", "audio": "a.wav"}) + "\n")
    out_dir = tmp_path / "out"
    _one_line(capsys, _batch_args(tiny_weights, manifest, out_dir), ["line 1", "videoid is null"], [out_dir])
    assert not (out_dir / "None.mp4").exists()


def test_manifest_csv_seed_column_is_used(tmp_path, tiny_weights):
    """The extra ``seed`` column used to be dropped: the row rendered with the command's seed."""
    from avatar.compose import compose
    from avatar.validate import validate

    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    manifest = _manifest(tmp_path, b"", "rows.csv")
    manifest.write_text("videoid,image,audio,prompt,fps,seed\na,img.jpg,a.wav,hi,25,7\nb,img.jpg,a.wav,hi,25,\n")
    cfg = compose(_batch_args(tiny_weights, manifest, tmp_path / "out", "seed=3"))
    jobs = {job.videoid: job for job in validate(cfg).jobs}
    assert jobs["a"].seed == 7 and jobs["b"].seed == 3


def test_state_folder_that_is_a_regular_file(capsys, tmp_path, tiny_weights, built):
    """``<output>.state`` as a file used to end in a traceback once the models were built."""
    args, out = _single(tiny_weights, tmp_path)
    (tmp_path / "o.mp4.state").write_text("in the way")
    _one_line(capsys, args, ["output=", "o.mp4.state exists and is not a folder"], [out])
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / ".state").write_text("in the way")
    manifest = _manifest(tmp_path, b"a,img.jpg,a.wav,hi,25\n")
    _one_line(capsys, _batch_args(tiny_weights, manifest, out_dir), ["output_dir=", ".state exists and is not a"])
