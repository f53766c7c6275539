"""Driving audio: decode any common format to float32 mono at the model's sample rate.

Decoders, in order: soundfile (wav/flac/ogg/mp3 via libsndfile), PyAV (m4a/aac/mp4/webm/...), then the ffmpeg
binary bundled with imageio-ffmpeg. Channels are averaged to mono; the rate is converted with libsoxr's high-quality
resampler (``soxr``, what the official ``librosa.load(sr=16000)`` uses: its default ``res_type="soxr_hq"``), and the
length fixed to ``ceil(len · new / orig)`` as librosa does.

Only regular files are opened (a FIFO or device is refused from its ``stat``, never read), always by their absolute
path through ffmpeg's ``file:`` protocol, so ``file:x.wav`` or ``take:1.wav`` names that file. The decoded length is
compared with the container's: a corrupt stretch that the decoder skipped (decoded shorter or longer by more than one
video frame) is refused naming both durations, or with ``audio.allow_damaged=true`` rendered with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess

import numpy as np

from avatar.config import FPS
from avatar.io.errors import InputError
from avatar.io.paths import check_input_file

log = logging.getLogger(__name__)

#: Video frame rate: audio shorter than one frame cannot drive a video.
VIDEO_FPS = FPS

#: libsoxr quality of the official path (``librosa.load``'s default ``soxr_hq``).
SOXR_QUALITY = "HQ"


# --- decoders -----------------------------------------------------------------------------------------------------


def _decode_soundfile(path: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data, int(rate)


def _decode_pyav(path: str) -> tuple[np.ndarray, int]:
    import av

    with av.open(_ffmpeg_path(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        layout = stream.codec_context.layout.name if stream.codec_context.layout else None
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros((0, 1), np.float32), int(rate)
    data = np.concatenate(chunks, axis=1).T  # (samples, channels)
    return np.ascontiguousarray(data, dtype=np.float32), int(rate)


def _decode_ffmpeg(path: str, sample_rate: int) -> tuple[np.ndarray, int]:
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", _ffmpeg_path(path), "-vn", "-ac", "1"]
    cmd += ["-ar", str(sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["ffmpeg failed"]
        raise ValueError(tail[0])
    data = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
    return data[:, None], int(sample_rate)


def _ffmpeg_path(path: str) -> str:
    return "file:" + os.path.abspath(path)


def container_seconds(path: str) -> float | None:
    """The duration the file's header declares (None when it declares none)."""
    try:
        import av

        with av.open(_ffmpeg_path(path)) as container:
            if container.streams.audio:
                stream = container.streams.audio[0]
                if stream.duration is not None and stream.time_base is not None:
                    return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1_000_000
    except Exception:  # noqa: BLE001 - no header duration; the decode decides
        pass
    try:
        import soundfile as sf

        return float(sf.info(path).duration)
    except Exception:  # noqa: BLE001
        return None


def _decode(path: str, sample_rate: int) -> tuple[np.ndarray, int]:
    errors = []
    for name, fn in (("soundfile", _decode_soundfile), ("pyav", _decode_pyav)):
        try:
            return fn(path)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "try the next one"
            errors.append(f"{name}: {err}")
    try:
        return _decode_ffmpeg(path, sample_rate)
    except Exception as err:  # noqa: BLE001
        errors.append(f"ffmpeg: {err}")
    raise ValueError("; ".join(e.replace("\n", " ") for e in errors))


# --- resampling ---------------------------------------------------------------------------------------------------


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a 1-D float signal with libsoxr (HQ); output length ``ceil(len · new / orig)`` (librosa's
    ``fix_length``: zero-padded or cut)."""
    if orig_rate == new_rate or len(wav) == 0:
        return np.asarray(wav, dtype=np.float32)
    import soxr

    target = int(math.ceil(int(new_rate) * len(wav) / int(orig_rate)))
    y = soxr.resample(np.ascontiguousarray(wav, dtype=np.float32), int(orig_rate), int(new_rate), quality=SOXR_QUALITY)
    if len(y) < target:
        y = np.pad(y, (0, target - len(y)))
    return np.ascontiguousarray(y[:target], dtype=np.float32)


# --- public -------------------------------------------------------------------------------------------------------


def load_audio(
    path, sample_rate: int, max_seconds: float | None = None, allow_damaged: bool = False, info: dict | None = None
) -> np.ndarray:
    """Decode ``path`` to a float32 mono array at ``sample_rate``. Raises InputError naming the file for a missing,
    unreadable, non-regular, empty, damaged (decoded length ≠ the container's by more than a video frame, unless
    ``allow_damaged``), too short (< 1 video frame) or too long (> ``audio.max_seconds``) input. ``info`` (a dict)
    receives ``decoded_seconds``, ``container_seconds`` and ``damaged``."""
    path = os.fspath(path)
    what = "a wav, flac, mp3 or m4a speech file"
    check_input_file(path, "audio", what)
    if os.path.getsize(path) == 0:
        raise InputError(f"audio={path}: the file is empty (0 bytes); give a wav, flac, mp3 or m4a speech file")
    try:
        data, rate = _decode(path, int(sample_rate))
    except ValueError as err:
        raise InputError(
            f"audio={path}: not a readable audio file or the file is corrupt ({err}); "
            "give a wav, flac, mp3 or m4a speech file"
        ) from err
    if data.ndim == 1:
        data = data[:, None]
    if data.shape[0] == 0 or rate <= 0:
        raise InputError(f"audio={path}: contains no audio samples (zero length); give a non-empty speech file")
    wav = data.mean(axis=1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wav).all():
        raise InputError(f"audio={path}: contains NaN or infinite samples; re-export it as 16-bit PCM wav")
    seconds = len(wav) / rate
    declared = container_seconds(path)
    damaged = declared is not None and abs(declared - seconds) > 1.0 / VIDEO_FPS
    if info is not None:
        info.update(decoded_seconds=seconds, container_seconds=declared, damaged=damaged)
    if damaged:
        detail = (
            f"audio={path}: decodes to {seconds:.2f} s but the file declares {declared:.2f} s (a corrupt or "
            f"truncated stretch)"
        )
        if not allow_damaged:
            raise InputError(f"{detail}; re-export the audio, or pass audio.allow_damaged=true to render what decodes")
        log.warning("%s; rendering it anyway (audio.allow_damaged=true; report: audio_damaged)", detail)
    if seconds < 1.0 / VIDEO_FPS:
        raise InputError(
            f"audio={path}: {seconds * 1000:.1f} ms is shorter than one video frame "
            f"({1000 / VIDEO_FPS:.0f} ms at {VIDEO_FPS} fps); give at least {1 / VIDEO_FPS:g} s of audio"
        )
    if max_seconds is not None and seconds > float(max_seconds):
        raise InputError(
            f"audio={path}: {seconds:.2f} s is longer than audio.max_seconds={max_seconds:g}; "
            f"shorten the audio or raise audio.max_seconds"
        )
    return resample(wav, rate, int(sample_rate))
