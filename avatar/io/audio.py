"""Driving audio: decode any common format to float32 mono at the model's sample rate.

Decoders, in order: soundfile (wav/flac/ogg/mp3 via libsndfile), PyAV (m4a/aac/mp4/webm/...), then the ffmpeg
binary bundled with imageio-ffmpeg. Channels are averaged to mono; the rate is converted with libsoxr's high-quality
resampler (``soxr``, what the official ``librosa.load(sr=16000)`` uses: its default ``res_type="soxr_hq"``), and the
length fixed to ``ceil(len · new / orig)`` as librosa does.

Only regular files are opened (a FIFO or device is refused from its ``stat``, never read), always by their absolute
path through ffmpeg's ``file:`` protocol, so ``file:x.wav`` or ``take:1.wav`` names that file. The decoded length is
compared with the one the file declares (for WAV the ``data`` chunk's size, which decoders silently clip to what the
file holds, else the container's): a truncated file or a corrupt stretch that the decoder skipped (decoded shorter or
longer by more than one video frame) is refused naming both durations, or with ``audio.allow_damaged=true`` rendered
with a warning.

Sense checks on what decodes: every sample finite; sample rates below ``MIN_SAMPLE_RATE`` (8 kHz, telephone speech;
the audio encoder works at 16 kHz) refused, since upsampling cannot restore the missing band; float samples beyond
[-1, 1] rescaled to a peak of 1 with a warning up to ``MAX_PEAK`` (``info["gain"]`` records the factor, and the mux
applies the same gain, so the sound track is what drove the face), refused beyond it (integer-scaled or garbage
floats: the AAC encoder would fail on them after the whole render).
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

#: Lowest accepted sample rate of the input (Hz): telephone speech; below it the speech band is gone.
MIN_SAMPLE_RATE = 8000

#: Largest accepted sample peak (|x|, full scale = 1). Float files up to it are rescaled to a peak of 1 with a
#: warning; beyond it they are refused.
MAX_PEAK = 8.0


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


def wav_header_seconds(path: str) -> float | None:
    """The duration a RIFF/WAVE file's ``data`` chunk declares (None: not a WAV, or a streaming WAV whose size field
    is 0 or 0xFFFFFFFF). Decoders clip a truncated file's data to what is there; the header keeps the claim."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            rate = block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"fmt ":
                    fmt = f.read(min(size, 16))
                    if len(fmt) < 16:
                        return None
                    _, _, rate, _, block_align = struct.unpack("<HHIIH", fmt[:14])
                    f.seek(size - 16 + (size & 1), os.SEEK_CUR)
                elif name == b"data":
                    if not rate or not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align / rate
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None


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


def _gain(path: str, data: np.ndarray) -> float:
    """1.0 for samples within [-1, 1]; ``1 / peak`` (with a warning) up to ``MAX_PEAK``; InputError beyond."""
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak <= 1.0:
        return 1.0
    if peak > MAX_PEAK:
        raise InputError(
            f"audio={path}: samples reach {peak:.3g}, far outside the [-1, 1] full scale of float audio (at most "
            f"{MAX_PEAK:g} is rescaled); it is not speech as saved (integer-scaled or corrupt float samples), so "
            "re-export it as 16-bit PCM wav"
        )
    log.warning(
        "audio=%s: samples reach %.3g, beyond the [-1, 1] full scale; rescaled by %.3g to a peak of 1 (the video's "
        "sound track gets the same gain)",
        path,
        peak,
        1.0 / peak,
    )
    return 1.0 / peak


def load_audio(
    path, sample_rate: int, max_seconds: float | None = None, allow_damaged: bool = False, info: dict | None = None
) -> np.ndarray:
    """Decode ``path`` to a float32 mono array at ``sample_rate``. Raises InputError naming the file for a missing,
    unreadable, non-regular, empty, damaged (decoded length ≠ the container's by more than a video frame, unless
    ``allow_damaged``), too short (< 1 video frame), too long (> ``audio.max_seconds``), too coarsely sampled (<
    ``MIN_SAMPLE_RATE``) or far out of range (peak > ``MAX_PEAK``) input. ``info`` (a dict) receives
    ``decoded_seconds``, ``container_seconds`` (what the file declares), ``damaged``, ``gain`` (1.0, or the
    rescale factor of a peak beyond 1) and the native ``sample_rate``."""
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
    if rate < MIN_SAMPLE_RATE:
        raise InputError(
            f"audio={path}: sampled at {rate} Hz, below the {MIN_SAMPLE_RATE} Hz that speech needs (the audio encoder "
            f"works at {int(sample_rate)} Hz and upsampling cannot restore the missing band); give a recording at "
            f"{MIN_SAMPLE_RATE} Hz or more"
        )
    if not np.isfinite(data).all():
        raise InputError(f"audio={path}: contains NaN or infinite samples; re-export it as 16-bit PCM wav")
    gain = _gain(path, data)
    if gain != 1.0:
        data = data * np.float32(gain)
    wav = data.mean(axis=1, dtype=np.float64).astype(np.float32) if data.shape[1] > 1 else data[:, 0]
    seconds = len(wav) / rate
    declared = wav_header_seconds(path)
    if declared is None:
        declared = container_seconds(path)
    damaged = declared is not None and abs(declared - seconds) > 1.0 / VIDEO_FPS
    if info is not None:
        info.update(decoded_seconds=seconds, container_seconds=declared, damaged=damaged, gain=gain, sample_rate=rate)
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
