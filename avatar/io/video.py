"""mp4 output: stream uint8 RGB frames into ffmpeg (libx264, yuv420p), mux the speech as AAC, publish atomically.

``VideoWriter`` never leaves a partial file at its target path: frames go to a hidden temporary in the same folder,
``close()`` muxes the audio (padded with silence / trimmed to exactly ``frames / fps``) into a second temporary and
publishes it at the target without replacing anything that appeared there meanwhile (``avatar.io.atomic.publish``;
``replace=True`` replaces atomically); ``abort()`` (or an exception inside ``with``) kills ffmpeg and removes both.
Every path handed to ffmpeg is absolute and spelled ``file:/abs/path``, so a name like ``take:1.wav`` or ``-x.wav``
is a file, never a protocol or an option. A write fault (disk full, quota, read-only) is raised as one line naming
the path.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from fractions import Fraction

import numpy as np

from avatar.config import X264Preset
from avatar.io.atomic import fsync_path, publish, temp_name
from avatar.io.errors import InputError, WriteError

#: ffmpeg's words for the write faults it hit, and their errno.
_FFMPEG_WRITE_FAULTS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": getattr(errno, "EDQUOT", errno.ENOSPC),
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "File too large": errno.EFBIG,
}


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_path(path) -> str:
    """``path`` as ffmpeg must get it: absolute, through the ``file`` protocol (never ``proto:`` or ``-option``)."""
    return "file:" + os.path.abspath(os.fspath(path))


def _write_fault(text: str, path: str) -> WriteError | None:
    for words, code in _FFMPEG_WRITE_FAULTS.items():
        if words in text:
            return WriteError(code, os.strerror(code), path)
    return None


def _stderr_tail(handle, lines: int = 8) -> str:
    try:
        handle.seek(0)
        text = handle.read().decode(errors="replace").strip().splitlines()
    except (OSError, ValueError):
        return ""
    return " | ".join(text[-lines:])


def _remove(path: str | None) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class VideoWriter:
    """Streams ``[n, H, W, 3]`` uint8 RGB frames into an H.264 mp4 at ``path``.

    ``write`` any number of times, then ``close()`` (mux + atomic rename; or ``finish()`` then ``commit()``) or
    ``abort()`` (nothing at ``path``). As a context manager it closes on success and aborts on an exception."""

    def __init__(
        self,
        path,
        fps: float,
        width: int,
        height: int,
        audio_path=None,
        crf: int = 18,
        preset: str = "medium",
        replace: bool = False,
        audio_gain: float = 1.0,
    ):
        self.path = os.path.abspath(os.fspath(path))
        self.fps = fps
        self.width, self.height = int(width), int(height)
        self.audio_path = os.fspath(audio_path) if audio_path is not None else None
        self.crf, self.preset = crf, str(preset)
        self.replace = replace
        self.audio_gain = float(audio_gain)  # the rescale of an out-of-range float input (avatar.io.audio)
        self.published: str | None = None
        if not (isinstance(crf, (int, np.integer)) and not isinstance(crf, bool) and 0 <= crf <= 51):
            raise InputError(f"output.crf={crf!r} is invalid; give an integer from 0 (lossless) to 51")
        if self.preset not in X264Preset.__members__:
            raise InputError(f"output.preset={preset!r} is invalid; give one of {', '.join(X264Preset)}")
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"video size {self.width}x{self.height} must be positive and even (yuv420p)")
        if float(fps) <= 0:
            raise ValueError(f"fps={fps} must be positive")
        if self.audio_path is not None and not os.path.isfile(self.audio_path):
            raise InputError(f"audio={self.audio_path}: file not found (needed to mux the video's sound track)")
        self._frames = 0
        self._state = "open"
        self._video_tmp = temp_name(self.path, "video.mp4")
        self._mux_tmp: str | None = None
        self._final: str | None = None
        self._log = tempfile.TemporaryFile()
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
        cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}"]
        cmd += ["-framerate", self._rate_str(), "-i", "pipe:0", "-an"]
        cmd += ["-c:v", "libx264", "-preset", self.preset, "-crf", str(int(crf)), "-pix_fmt", "yuv420p"]
        cmd += ["-r", self._rate_str(), "-movflags", "+faststart", "-f", "mp4", ffmpeg_path(self._video_tmp)]
        try:
            # its own session: a SIGTERM/SIGINT sent to our process group (preemption, Ctrl-C) reaches us, and we
            # checkpoint and stop the encoder ourselves, instead of killing it mid-stream
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
            )
        except OSError:
            self._log.close()
            raise

    # --- public --------------------------------------------------------------------------------------------------

    @property
    def frames_written(self) -> int:
        return self._frames

    def write(self, frames: np.ndarray) -> None:
        """Append frames: ``[n, H, W, 3]`` (or one ``[H, W, 3]``) uint8 RGB."""
        if self._state != "open":
            raise RuntimeError(f"VideoWriter for {self.path} is {self._state}")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.dtype != np.uint8:
            raise TypeError(f"frames must be uint8, got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [n, {self.height}, {self.width}, 3], got {list(frames.shape)}")
        if frames.shape[0] == 0:
            return
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except (BrokenPipeError, OSError) as err:
            self._proc.wait()
            detail = _stderr_tail(self._log)
            self.abort()
            fault = _write_fault(detail, self._video_tmp)
            if fault is not None:
                raise fault from None
            raise RuntimeError(f"ffmpeg stopped while encoding {self.path}: {detail or err}") from err
        self._frames += frames.shape[0]

    def close(self) -> None:
        """Finish encoding, mux the audio (AAC, exactly the video's length) and rename onto ``path``."""
        if self._state == "closed":
            return
        self.finish()
        self.commit()

    def finish(self) -> None:
        """Finish encoding and mux the audio into a complete, fsynced temporary file; ``path`` is not touched yet.
        Lets a caller record the output as done before it appears (``commit``), so a kill in between never leaves
        an output that a rerun does not recognise as its own."""
        if self._state != "open":
            raise RuntimeError(f"VideoWriter for {self.path} is {self._state}")
        try:
            if self._frames == 0:
                raise RuntimeError(f"no frames were written to {self.path}")
            self._proc.stdin.close()
            code = self._proc.wait()
            if code != 0:
                detail = _stderr_tail(self._log)
                fault = _write_fault(detail, self._video_tmp)
                if fault is not None:
                    raise fault
                raise RuntimeError(f"ffmpeg failed encoding {self.path} (exit {code}): {detail}")
            self._final = self._video_tmp
            if self.audio_path is not None:
                self._mux_tmp = temp_name(self.path, "mux.mp4")
                self._mux(self._mux_tmp)
                self._final = self._mux_tmp
            fsync_path(self._final)
            self._check_final()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"

    def commit(self) -> str:
        """Publish the finished file at ``path`` (atomic; never over a file that appeared meanwhile unless
        ``replace``: then it goes to the conflict sibling, see ``avatar.io.atomic.publish``), remove the temporaries
        and return where it went (also ``self.published``)."""
        if self._state != "finished":
            raise RuntimeError(f"VideoWriter for {self.path} is {self._state}, not finished")
        try:
            self.published = publish(self._final, self.path, replace=self.replace)
        except BaseException:
            self.abort()
            raise
        self._cleanup()
        self._state = "closed"
        return self.published

    def abort(self) -> None:
        """Kill ffmpeg and remove the temporaries; nothing is left at ``path``. Safe to call more than once."""
        if self._state in ("closed", "aborted"):
            return
        self._state = "aborted"
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            try:
                proc.stdin.close()
            except (OSError, ValueError):
                pass
            proc.wait()
        self._cleanup()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        try:
            if self._state in ("open", "finished"):
                self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # --- internals -----------------------------------------------------------------------------------------------

    def _rate_str(self) -> str:
        rate = Fraction(self.fps).limit_denominator(1001000)
        return f"{rate.numerator}/{rate.denominator}"

    def _mux(self, out: str) -> None:
        duration = float(self._frames / Fraction(self._rate_str()))
        cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
        cmd += ["-i", ffmpeg_path(self._video_tmp), "-i", ffmpeg_path(self.audio_path)]
        cmd += ["-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "192k"]
        # pad short audio with silence, cut long audio: the file lasts exactly frames / fps. No -shortest: under load
        # its sync queue could end the file a frame early (seen: 49 of 50 frames); -t alone keeps every frame.
        volume = f"volume={self.audio_gain:.9g}," if self.audio_gain != 1.0 else ""
        cmd += ["-af", f"{volume}apad", "-t", f"{duration:.6f}", "-movflags", "+faststart", "-f", "mp4"]
        cmd.append(ffmpeg_path(out))
        proc = subprocess.run(cmd, capture_output=True, timeout=3600)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.decode(errors="replace").strip().splitlines()[-8:])
            fault = _write_fault(tail, out)
            if fault is not None:
                raise fault
            raise RuntimeError(f"ffmpeg failed muxing {self.audio_path} into {self.path}: {tail}")

    def _check_final(self) -> None:
        """Read the finished file back before it is published: every frame written is there and, with audio, the
        sound track too (a truncated encode or mux is an error naming the file, never a published video)."""
        info = probe(self._final)
        if info.frames != self._frames:
            raise RuntimeError(
                f"{self.path}: the encoded file holds {info.frames} of the {self._frames} frames written"
            )
        if self.audio_path is not None and not info.audio_streams:
            raise RuntimeError(f"{self.path}: the muxed file has no audio stream from {self.audio_path}")

    def _cleanup(self) -> None:
        _remove(self._video_tmp)
        _remove(self._mux_tmp)
        self._mux_tmp = None
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()


# --- reading ------------------------------------------------------------------------------------------------------


class VideoInfo(dict):
    """``probe`` result: a dict whose keys are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def probe(path) -> VideoInfo:
    """Streams of an mp4: frames, fps, width, height, duration (s), video_codec, audio_codec, audio_sample_rate,
    audio_duration, audio_streams, video_streams (missing values are None)."""
    import av

    path = os.fspath(path)
    with av.open(path) as container:
        videos, audios = container.streams.video, container.streams.audio
        info = VideoInfo(
            frames=0,
            fps=None,
            width=None,
            height=None,
            duration=container.duration / 1_000_000 if container.duration is not None else None,
            video_codec=None,
            video_duration=None,
            pix_fmt=None,
            audio_codec=None,
            audio_sample_rate=None,
            audio_channels=None,
            audio_duration=None,
            video_streams=len(videos),
            audio_streams=len(audios),
        )
        if videos:
            v = videos[0]
            rate = v.guessed_rate or v.average_rate or v.base_rate
            info.update(
                fps=float(rate) if rate else None,
                width=v.codec_context.width,
                height=v.codec_context.height,
                video_codec=v.codec_context.name,
                pix_fmt=v.codec_context.pix_fmt,
                video_duration=float(v.duration * v.time_base) if v.duration is not None else None,
            )
            frames = v.frames
            if not frames:
                frames = sum(1 for packet in container.demux(v) if packet.size)
            info["frames"] = int(frames)
        if audios:
            a = audios[0]
            info.update(
                audio_codec=a.codec_context.name,
                audio_sample_rate=a.codec_context.sample_rate,
                audio_channels=a.codec_context.layout.nb_channels if a.codec_context.layout else None,
                audio_duration=float(a.duration * a.time_base) if a.duration is not None else None,
            )
    if info["duration"] is None:
        info["duration"] = info["video_duration"]
    return info
