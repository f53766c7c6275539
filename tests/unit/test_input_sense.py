"""Inputs checked for sense, not only for shape (issue 22): audio sample range, rate and the WAV header's duration;
the image's aspect ratio against the bucket rule; the ffmpeg binary probed before any model. Real files and the
bundled ffmpeg; the broken binaries are small scripts written here (stand-ins for a user's bad IMAGEIO_FFMPEG_EXE)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from avatar.io.audio import MAX_PEAK, MIN_SAMPLE_RATE, load_audio, wav_header_seconds
from avatar.io.errors import InputError
from avatar.io.ffmpeg import probe_ffmpeg
from avatar.io.image import MAX_ASPECT_RATIO, check_geometry
from avatar.io.video import VideoWriter, ffmpeg_exe

RATE = 16000


def _tone(seconds: float, peak: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (peak * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


# --- audio -----------------------------------------------------------------------------------------------------------


def test_absurd_float_samples_are_refused(tmp_path):
    """1e30 samples passed validation and failed only in the AAC mux, after the whole render."""
    path = tmp_path / "loud.wav"
    sf.write(path, _tone(1.0, 1e30), RATE, subtype="FLOAT")
    with pytest.raises(InputError, match=r"loud.wav: samples reach 1e\+30.*16-bit PCM"):
        load_audio(path, RATE)


def test_float_samples_a_little_beyond_full_scale_are_rescaled(tmp_path, caplog):
    path = tmp_path / "hot.wav"
    sf.write(path, _tone(1.0, 4.0), RATE, subtype="FLOAT")
    info: dict = {}
    with caplog.at_level("WARNING"):
        wav = load_audio(path, RATE, info=info)
    assert abs(np.abs(wav).max() - 1.0) < 1e-3 and info["gain"] == pytest.approx(0.25, rel=1e-3)
    assert "rescaled" in caplog.text
    assert 4.0 < MAX_PEAK
    plain = tmp_path / "plain.wav"
    sf.write(plain, _tone(1.0, 0.5), RATE, subtype="PCM_16")
    info = {}
    load_audio(plain, RATE, info=info)
    assert info["gain"] == 1.0


def _muxed_samples(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        chunks = [frame.to_ndarray().ravel() for frame in container.decode(audio=0)]
    return np.concatenate(chunks)


def test_mux_applies_the_same_gain(tmp_path):
    path = tmp_path / "hot.wav"
    sf.write(path, _tone(2.0, 4.0), RATE, subtype="FLOAT")
    out = tmp_path / "v.mp4"
    with VideoWriter(out, 25, 64, 64, audio_path=path, preset="ultrafast", audio_gain=0.25) as writer:
        writer.write(np.zeros((25, 64, 64, 3), np.uint8))
    samples = _muxed_samples(out)
    assert 0.8 < np.abs(samples).max() < 1.05


def test_sample_rate_below_speech_is_refused(tmp_path):
    path = tmp_path / "coarse.wav"
    sf.write(path, _tone(1.0, 0.5, 4000), 4000, subtype="PCM_16")
    with pytest.raises(InputError, match=f"coarse.wav: sampled at 4000 Hz, below the {MIN_SAMPLE_RATE} Hz"):
        load_audio(path, RATE)
    ok = tmp_path / "phone.wav"
    sf.write(ok, _tone(1.0, 0.5, 8000), 8000, subtype="PCM_16")
    assert len(load_audio(ok, RATE)) == RATE


def test_truncated_wav_header_duration_disagrees(tmp_path, caplog):
    """Decoders clip a truncated WAV to what is there; the header still declares the whole length."""
    full = tmp_path / "full.wav"
    sf.write(full, _tone(4.0, 0.5), RATE, subtype="PCM_16")
    assert wav_header_seconds(str(full)) == pytest.approx(4.0)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[: 44 + 2 * 2 * RATE])  # header + 2 s of 16-bit samples
    assert wav_header_seconds(str(cut)) == pytest.approx(4.0)
    with pytest.raises(InputError, match=r"cut.wav: decodes to 2.00 s but the file declares 4.00 s"):
        load_audio(cut, RATE)
    with caplog.at_level("WARNING"):
        assert len(load_audio(cut, RATE, allow_damaged=True)) == 2 * RATE
    assert "rendering it anyway" in caplog.text
    assert wav_header_seconds(str(Path(__file__))) is None


# --- image -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 4000), (4000, 64), (300, 1500)])
def test_extreme_aspect_ratio_is_refused(size):
    with pytest.raises(InputError, match=rf"image=x.png: {size[0]}x{size[1]} px is .*beyond the 4:1"):
        check_geometry("x.png", *size, 704, 64)


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (2560, 1080), (400, 1600), (512, 512)])
def test_ordinary_shapes_pass_and_give_the_bucket(size):
    from avatar.io.image import bucket_size

    assert max(size) / min(size) <= MAX_ASPECT_RATIO
    assert check_geometry("x.png", *size, 704, 64) == bucket_size(*size, 704, 64)


# --- ffmpeg ----------------------------------------------------------------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_bundled_ffmpeg_passes(monkeypatch):
    monkeypatch.delenv("IMAGEIO_FFMPEG_EXE", raising=False)
    info = probe_ffmpeg()
    assert {"libx264", "aac"} <= info.encoders and info.version


def test_broken_ffmpeg_binaries_are_named(monkeypatch, tmp_path):
    cases = {
        str(tmp_path / "missing"): "no such file",
        str(tmp_path): "is a folder",
        str(_script(tmp_path / "fails", "exit 3\n")): "exits with 3",
        str(_script(tmp_path / "talks", "echo hello\n")): "is not ffmpeg",
    }
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    cases[str(noexec)] = "not executable"
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00garbage")
    garbage.chmod(0o755)
    cases[str(garbage)] = "cannot be run"
    real = ffmpeg_exe()
    # a real ffmpeg whose encoder list lacks libx264 (an LGPL build)
    lgpl = _script(
        tmp_path / "lgpl",
        f'if [ "$2" = "-encoders" ]; then "{real}" -hide_banner -encoders | grep -v libx264; '
        f'else exec "{real}" "$@"; fi\n',
    )
    cases[str(lgpl)] = "has no libx264 encoder"
    for exe, expect in cases.items():
        monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", exe)
        with pytest.raises(InputError) as err:
            probe_ffmpeg()
        message = str(err.value)
        assert f"IMAGEIO_FFMPEG_EXE={exe}" in message and expect in message and "unset IMAGEIO_FFMPEG_EXE" in message
        assert "\n" not in message


def test_probe_runs_ffmpeg_once_per_binary(monkeypatch, tmp_path):
    real = ffmpeg_exe()
    calls = tmp_path / "calls"
    counting = _script(tmp_path / "counting", f'echo x >> "{calls}"\nexec "{real}" "$@"\n')
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(counting))
    probe_ffmpeg()
    probe_ffmpeg()
    assert len(calls.read_text().splitlines()) == 2  # -version and -encoders, once
    assert subprocess.run([str(counting), "-version"], capture_output=True).returncode == 0
    assert os.path.isfile(calls)
