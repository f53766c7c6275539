"""avatar.io: image loading and bucketing, audio decoding/resampling, the mp4 writer, atomic writes, validation.
Real files in tmp_path (PIL, soundfile, the bundled ffmpeg); no mocks."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avatar.io.atomic import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text
from avatar.io.audio import load_audio, resample
from avatar.io.errors import InputError
from avatar.io.image import bucket_size, load_image, resize_to_bucket
from avatar.io.video import VideoWriter, ffmpeg_exe, probe
from avatar.validate import check_output_path, check_steps
from tests.utils.video import read_frames

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono] * channels, axis=1).astype(np.float32) if channels > 1 else mono.astype(np.float32)


def _frames(n: int, h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- image -----------------------------------------------------------------------------------------------------------


def test_load_example_portrait():
    image = load_image(EXAMPLES / "portrait.jpg")
    assert image.mode == "RGB" and min(image.size) >= 64


def test_exif_orientation_is_applied(tmp_path):
    # a 200x100 image, left half red, stored with orientation 6 ("rotate 90° clockwise to display")
    raw = Image.new("RGB", (200, 100), "blue")
    raw.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    raw.save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (100, 200)
    top = np.asarray(image)[10, 50]
    bottom = np.asarray(image)[190, 50]
    assert top[0] > 200 and top[2] < 60, top  # the red half is on top after a clockwise turn
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_modes_convert_to_rgb(tmp_path, mode):
    base = Image.new("RGB", (80, 72), (200, 100, 50))
    if mode == "I;16":
        arr = np.full((72, 80), 40000, dtype=np.uint16)
        image = Image.fromarray(arr)
        expected = round(40000 / 65535 * 255)
    elif mode == "I":
        image = Image.fromarray(np.full((72, 80), 50000, dtype=np.int32))
        expected = round(50000 / 65535 * 255)
    elif mode == "F":
        image = Image.fromarray(np.full((72, 80), 0.5, dtype=np.float32))
        expected = 128
    else:
        image = base.convert(mode)
        expected = None
    suffix = ".tiff" if mode in ("CMYK", "I;16", "I", "F") else ".png"
    path = tmp_path / f"img_{mode.replace(';', '')}{suffix}"
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (80, 72)
    if expected is not None:
        assert abs(int(np.asarray(out)[5, 5, 0]) - expected) <= 1


def test_transparency_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 32, 64))
    path = tmp_path / "alpha.png"
    rgba.save(path)
    arr = np.asarray(load_image(path))
    assert tuple(arr[10, 10]) == (255, 0, 0)
    assert tuple(arr[10, 50]) == (255, 255, 255)


def test_16bit_png(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((70, 70), 65535, dtype=np.uint16)).save(path)
    assert tuple(np.asarray(load_image(path))[0, 0]) == (255, 255, 255)


def test_image_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nothere.jpg.*not found"):
        load_image(tmp_path / "nothere.jpg")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text, not a picture")
    with pytest.raises(InputError, match="fake.jpg.*not a readable image"):
        load_image(fake)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((EXAMPLES / "portrait.jpg").read_bytes()[:600])
    with pytest.raises(InputError, match="truncated.jpg"):
        load_image(truncated)
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 200), "red").save(small)
    with pytest.raises(InputError, match=r"small.png: 48x200 px is too small; the minimum is 64 px"):
        load_image(small)


def test_bucket_rule_official_examples():
    assert bucket_size(1280, 720, 704, 64) == (1216, 704)
    assert bucket_size(720, 1280, 704, 64) == (704, 1216)
    assert bucket_size(512, 512, 704, 64) == (704, 704)
    assert bucket_size(3000, 3000, 704, 64) == (704, 704)
    assert bucket_size(768, 1024, 704, 64) == (704, 960)  # 4:3 portrait, under the area cap
    assert bucket_size(512, 512, 128, 64) == (128, 128)  # the tiny model
    for w, h in [(1280, 720), (333, 999), (4000, 3000), (100, 64)]:
        bw, bh = bucket_size(w, h, 704, 64)
        assert bw % 64 == 0 and bh % 64 == 0 and bw * bh <= 704 * 1216


def test_resize_to_bucket(tmp_path):
    image = Image.new("RGB", (1280, 720), "green")
    out = resize_to_bucket(image, bucket_size(*image.size, 704, 64))
    assert out.size == (1216, 704) and out.mode == "RGB"
    # crop mode keeps the aspect ratio: a left red stripe gets cut off when the target is narrower
    wide = Image.new("RGB", (300, 100), "blue")
    wide.paste((255, 0, 0), (0, 0, 50, 100))
    cropped = np.asarray(resize_to_bucket(wide, (128, 128), crop=True))
    assert cropped.shape == (128, 128, 3) and cropped[64, 2, 2] > 200


# --- audio -----------------------------------------------------------------------------------------------------------


def test_example_speech_loads():
    wav = load_audio(EXAMPLES / "speech_5s.wav", 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - sf.info(str(EXAMPLES / "speech_5s.wav")).frames) == 0


def test_resample_44k_stereo_to_16k_mono(tmp_path):
    path = tmp_path / "stereo.wav"
    data = _tone(2.0, 44100, channels=2)
    data[:, 1] *= 0.5
    sf.write(path, data, 44100)
    wav = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == math.ceil(len(data) * 16000 / 44100) == 32000
    # mono = mean of the channels; the 440 Hz tone survives the rate change with its amplitude
    reference = 0.75 * 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(wav)) / 16000)
    assert np.abs(wav[300:-300] - reference[300:-300]).max() < 2e-3


def test_resampler_rejects_aliases():
    x = _tone(1.0, 48000, freq=12000.0)  # above the 8 kHz Nyquist of 16 kHz
    y = resample(x, 48000, 16000)
    assert len(y) == 16000 and np.sqrt(np.mean(y[200:-200] ** 2)) < 1e-3


@pytest.mark.parametrize("rate", [8000, 22050, 44099])  # up, down, and an odd rate coprime with 16 kHz
def test_resample_keeps_a_tone_and_the_length_contract(rate):
    x = _tone(1.5, rate, freq=300.0)
    y = resample(x, rate, 16000)
    assert y.dtype == np.float32 and len(y) == math.ceil(len(x) * 16000 / rate)
    reference = 0.5 * np.sin(2 * np.pi * 300 * np.arange(len(y)) / 16000)
    assert np.abs(y[400:-400] - reference[400:-400]).max() < 2e-3


@pytest.mark.parametrize("fmt", ["mp3", "m4a"])
def test_compressed_formats_via_fallback(tmp_path, fmt):
    src = tmp_path / "src.wav"
    sf.write(src, _tone(1.0, 22050), 22050)
    path = tmp_path / f"speech.{fmt}"
    codec = ["-c:a", "libmp3lame"] if fmt == "mp3" else ["-c:a", "aac"]
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), *codec, str(path)], check=True)
    wav = load_audio(path, 16000)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) / 16000 - 1.0) < 0.1  # encoder delay/padding adds a few ms
    assert 0.2 < np.abs(wav).max() < 0.7


def test_audio_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nothere.wav.*not found"):
        load_audio(tmp_path / "nothere.wav", 16000)
    fake = tmp_path / "fake.wav"
    fake.write_bytes((EXAMPLES / "portrait.jpg").read_bytes())
    with pytest.raises(InputError, match="fake.wav.*not a readable audio file"):
        load_audio(fake, 16000)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"\x00\x01not audio at all" * 100)
    with pytest.raises(InputError, match="garbage.mp3"):
        load_audio(garbage, 16000)
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(InputError, match="zero.wav.*empty"):
        load_audio(zero_bytes, 16000)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="empty.wav.*no audio samples"):
        load_audio(empty, 16000)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(500, np.float32), 16000)  # 31 ms < 40 ms
    with pytest.raises(InputError, match="short.wav.*shorter than one video frame"):
        load_audio(short, 16000)
    with pytest.raises(InputError, match=r"speech_5s.wav: 5.00 s is longer than audio.max_seconds=2"):
        load_audio(EXAMPLES / "speech_5s.wav", 16000, max_seconds=2)
    assert len(load_audio(EXAMPLES / "speech_5s.wav", 16000, max_seconds=6)) > 0


# --- video -----------------------------------------------------------------------------------------------------------


def test_video_writer_with_audio(tmp_path):
    out = tmp_path / "clip.mp4"
    with VideoWriter(out, 25, 96, 64, audio_path=EXAMPLES / "speech_5s.wav", preset="ultrafast") as writer:
        writer.write(_frames(30, seed=1))
        writer.write(_frames(1, seed=2)[0])  # one [H, W, 3] frame
        writer.write(_frames(19, seed=3))
        assert writer.frames_written == 50
        assert not out.exists()  # nothing is published before close
    info = probe(out)
    assert info["frames"] == info.frames == 50
    assert info.fps == 25 and (info.width, info.height) == (96, 64)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.audio_streams == 1
    assert info.audio_sample_rate == 16000
    assert abs(info.duration - 2.0) <= 1 / 25  # audio (5 s) trimmed to the video
    assert abs(info.audio_duration - 2.0) <= 1 / 25
    assert _leftovers(tmp_path) == ["clip.mp4"]
    frames = read_frames(out)
    assert frames.shape == (50, 64, 96, 3) and frames.dtype == np.uint8


def test_video_writer_pads_short_audio(tmp_path):
    wav = tmp_path / "short.wav"
    sf.write(wav, _tone(1.0, 16000), 16000)
    out = tmp_path / "pad.mp4"
    with VideoWriter(out, 25, 64, 64, audio_path=wav, preset="ultrafast", crf=0) as writer:
        flat = np.full((50, 64, 64, 3), 120, np.uint8)
        writer.write(flat)
    info = probe(out)
    assert info.frames == 50 and abs(info.duration - 2.0) <= 1 / 25 and abs(info.audio_duration - 2.0) <= 1 / 25
    assert np.abs(read_frames(out).astype(int) - 120).max() <= 2


def test_video_writer_without_audio(tmp_path):
    out = tmp_path / "silent.mp4"
    writer = VideoWriter(str(out), 25, 64, 64, preset="ultrafast")
    writer.write(_frames(7, 64, 64))
    writer.close()
    info = probe(out)
    assert info.frames == 7 and info.audio_streams == 0 and info.audio_codec is None
    assert _leftovers(tmp_path) == ["silent.mp4"]


def test_video_writer_abort_leaves_nothing(tmp_path):
    out = tmp_path / "aborted.mp4"
    writer = VideoWriter(out, 25, 64, 64, audio_path=EXAMPLES / "speech_5s.wav")
    writer.write(_frames(10, 64, 64))
    writer.abort()
    writer.abort()  # idempotent
    assert _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        writer.write(_frames(1, 64, 64))


def test_video_writer_finish_then_commit_publishes_only_at_commit(tmp_path):
    out = tmp_path / "two_phase.mp4"
    writer = VideoWriter(out, 25, 64, 64, audio_path=EXAMPLES / "speech_5s.wav", preset="ultrafast")
    writer.write(_frames(10, 64, 64))
    writer.finish()
    assert not out.exists()  # complete, but not published
    with pytest.raises(RuntimeError, match="finished"):
        writer.write(_frames(1, 64, 64))
    writer.commit()
    assert probe(out).frames == 10 and _leftovers(tmp_path) == ["two_phase.mp4"]
    # a finished file that is aborted instead of committed leaves nothing
    other = VideoWriter(tmp_path / "dropped.mp4", 25, 64, 64, preset="ultrafast")
    other.write(_frames(3, 64, 64))
    other.finish()
    other.abort()
    assert _leftovers(tmp_path) == ["two_phase.mp4"]
    with pytest.raises(RuntimeError, match="not finished"):
        other.commit()


def test_video_writer_exception_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "failed.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(KeyError):
        with VideoWriter(out, 25, 64, 64, audio_path=EXAMPLES / "speech_5s.wav") as writer:
            writer.write(_frames(5, 64, 64))
            raise KeyError("boom")
    assert out.read_bytes() == b"previous result"  # the old file is untouched, no partial output
    assert _leftovers(tmp_path) == ["failed.mp4"]


def test_video_writer_rejects_bad_frames_and_options(tmp_path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(ValueError):
        with VideoWriter(out, 25, 64, 64) as writer:
            writer.write(np.zeros((2, 32, 64, 3), np.uint8))
    with pytest.raises(TypeError):
        with VideoWriter(out, 25, 64, 64) as writer:
            writer.write(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(RuntimeError, match="no frames"):
        VideoWriter(out, 25, 64, 64).close()
    with pytest.raises(InputError, match="output.preset"):
        VideoWriter(out, 25, 64, 64, preset="warp")
    with pytest.raises(InputError, match="output.crf"):
        VideoWriter(out, 25, 64, 64, crf=99)
    assert _leftovers(tmp_path) == []


# --- atomic ----------------------------------------------------------------------------------------------------------


def test_atomic_json_and_text(tmp_path):
    target = tmp_path / "report.json"
    obj = {"a": 1, "nan": float("nan"), "inf": float("inf"), "path": Path("/x/y"), "arr": np.arange(3)}
    obj.update(f32=np.float32(1.5), nested=[{"t": (1, 2)}], other=complex(1, 2))
    atomic_write_json(target, obj)
    text = target.read_text()
    loaded = json.loads(text)
    assert loaded["nan"] is None and loaded["inf"] is None and loaded["path"] == "/x/y"
    assert loaded["arr"] == [0, 1, 2] and loaded["f32"] == 1.5 and loaded["nested"] == [{"t": [1, 2]}]
    assert loaded["other"] == "(1+2j)"
    assert text.startswith('{\n  "a": 1')
    atomic_write_text(str(tmp_path / "note.txt"), "hello\n")
    assert (tmp_path / "note.txt").read_text() == "hello\n"
    assert _leftovers(tmp_path) == ["note.txt", "report.json"]


def test_atomic_torch_save_roundtrip(tmp_path):
    import torch

    target = tmp_path / "state.pt"
    atomic_torch_save({"x": torch.arange(4)}, target)
    assert torch.equal(torch.load(target)["x"], torch.arange(4))
    assert _leftovers(tmp_path) == ["state.pt"]


def test_atomic_path_error_keeps_old_file(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert isinstance(tmp, Path) and tmp.parent == tmp_path and tmp.suffix == ".bin"
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    with atomic_path(str(target)) as tmp:
        assert isinstance(tmp, str)
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == ["data.bin"]


# --- validate --------------------------------------------------------------------------------------------------------


def test_check_steps():
    assert check_steps(1) == 1 and check_steps(np.int64(50)) == 50 and check_steps(30.0) == 30
    for bad in (0, -3, 2.5, "10", True, None):
        with pytest.raises(InputError, match="sampling.steps"):
            check_steps(bad)


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "new.mp4", overwrite=False) == str(tmp_path / "new.mp4")
    with pytest.raises(InputError, match=r"out.avi must end in .mp4"):
        check_output_path(tmp_path / "out.avi", overwrite=False)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(folder, overwrite=True)
    with pytest.raises(InputError, match="no/such/dir.*does not exist"):
        check_output_path(tmp_path / "no" / "such" / "dir" / "o.mp4", overwrite=False)
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists.mp4 already exists; pass overwrite=true"):
        check_output_path(existing, overwrite=False)
    check_output_path(existing, overwrite=True)
    assert existing.read_bytes() == b"keep"
    parent_file = tmp_path / "plain"
    parent_file.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_output_path(parent_file / "o.mp4", overwrite=False)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write in a read-only folder")
def test_check_output_path_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="ro.*not writable"):
            check_output_path(ro / "o.mp4", overwrite=False)
    finally:
        ro.chmod(0o700)
