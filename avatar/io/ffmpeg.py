"""The ffmpeg binary, probed once at validation: it runs, it is ffmpeg, and it has the two encoders every output
needs (``libx264`` for the video, ``aac`` for the sound track).

The binary is the one ``imageio-ffmpeg`` picks: ``IMAGEIO_FFMPEG_EXE`` when set (taken as given, never tested by
imageio), else the bundled one. A missing, broken or incomplete binary would otherwise be found only at the encode
or the mux, after the whole render; ``probe_ffmpeg`` turns it into one ``InputError`` line before any model. The
result is cached per binary (path, size, mtime), so a server validating each request runs ffmpeg once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from avatar.io.errors import InputError

#: Encoders the writer uses (``avatar/io/video.py``).
REQUIRED_ENCODERS = ("libx264", "aac")
#: Seconds each probe command may take.
PROBE_TIMEOUT = 30.0

ENV = "IMAGEIO_FFMPEG_EXE"


@dataclass(frozen=True)
class FfmpegInfo:
    path: str
    version: str
    encoders: frozenset


def _where() -> tuple[str, str]:
    """``(path, label)``: the binary imageio-ffmpeg would run and how to name it in a message."""
    exe = os.environ.get(ENV)
    if exe:
        return exe, f"ffmpeg ({ENV}={exe})"
    import imageio_ffmpeg

    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as err:
        raise InputError(
            f"ffmpeg: none found ({err}); reinstall imageio-ffmpeg or set {ENV}=/path/to/ffmpeg"
        ) from None
    return exe, f"ffmpeg ({exe})"


def _fix(label: str) -> str:
    if label.startswith(f"ffmpeg ({ENV}="):
        return f"unset {ENV} (the bundled ffmpeg is used) or point it at an ffmpeg built with libx264 and aac"
    return f"reinstall imageio-ffmpeg or set {ENV}=/path/to/ffmpeg (built with libx264 and aac)"


def _run(exe: str, label: str, *args: str) -> str:
    try:
        proc = subprocess.run(
            [exe, "-hide_banner", *args], capture_output=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise InputError(
            f"{label} did not answer `{' '.join(args)}` within {PROBE_TIMEOUT:g} s; {_fix(label)}"
        ) from None
    except OSError as err:
        raise InputError(f"{label} cannot be run ({err.strerror or err}); {_fix(label)}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise InputError(
            f"{label} fails (`{' '.join(args)}` exits with {proc.returncode}{': ' + tail[0] if tail[0] else ''}); "
            f"{_fix(label)}"
        )
    return proc.stdout.decode(errors="replace")


@lru_cache(maxsize=8)
def _probe(exe: str, label: str, identity: tuple) -> FfmpegInfo:
    out = _run(exe, label, "-version")
    first = out.strip().splitlines()[0] if out.strip() else ""
    if not first.startswith("ffmpeg version"):
        raise InputError(f"{label} is not ffmpeg (`-version` says {first[:60]!r}); {_fix(label)}")
    encoders = set()
    listing = _run(exe, label, "-encoders")
    started = False
    for line in listing.splitlines():
        if line.strip().startswith("------"):
            started = True
            continue
        parts = line.split()
        if started and len(parts) >= 2:
            encoders.add(parts[1])
    missing = [name for name in REQUIRED_ENCODERS if name not in encoders]
    if missing:
        raise InputError(
            f"{label} has no {' and no '.join(missing)} encoder (the video is H.264 with an AAC sound track); "
            f"{_fix(label)}"
        )
    return FfmpegInfo(exe, first.split()[2] if len(first.split()) > 2 else "?", frozenset(encoders))


def probe_ffmpeg() -> FfmpegInfo:
    """Check the ffmpeg binary the writer will run (see the module docstring); InputError in one line otherwise."""
    exe, label = _where()
    resolved = shutil.which(exe) if os.sep not in exe else exe
    if resolved is None or not os.path.exists(resolved):
        raise InputError(f"{label}: no such file; {_fix(label)}")
    if os.path.isdir(resolved):
        raise InputError(f"{label} is a folder, not a program; {_fix(label)}")
    if not os.access(resolved, os.X_OK):
        raise InputError(f"{label} is not executable (permission denied); {_fix(label)}")
    st = os.stat(resolved)
    return _probe(resolved, label, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
