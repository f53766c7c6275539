"""Checks on job values that need no model: sampling steps and the output path."""

from __future__ import annotations

import numbers
import os
import tempfile

from avatar.io.errors import InputError


def check_steps(steps) -> int:
    """``sampling.steps`` must be an integer ≥ 1. Returns it as an int."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        else:
            raise InputError(f"sampling.steps={steps!r} is invalid; give an integer ≥ 1 (the official value is 50)")
    if steps < 1:
        raise InputError(f"sampling.steps={steps} is invalid; give an integer ≥ 1 (the official value is 50)")
    return int(steps)


def check_output_path(path, overwrite: bool) -> str:
    """The output must be a ``.mp4`` file path in an existing, writable folder; an existing file needs
    ``overwrite=true``. Returns the absolute path."""
    if path is None or os.fspath(path) == "":
        raise InputError("output is empty; give output=PATH.mp4")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"output={path} is a directory; give a file path ending in .mp4")
    if not path.lower().endswith(".mp4"):
        raise InputError(f"output={path} must end in .mp4 (the writer produces H.264/AAC mp4)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise InputError(f"output={path}: the folder {folder} does not exist; create it first or choose another path")
    if not os.path.isdir(folder):
        raise InputError(f"output={path}: {folder} is not a folder; choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output={path}: the folder {folder} is not writable; choose a writable output folder")
    try:
        # a real probe (ACLs, read-only mounts); O_TMPFILE where available, so nothing ever appears in the folder
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise InputError(
            f"output={path}: cannot write in {folder} ({err.strerror or err}); choose another folder"
        ) from err
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise InputError(f"output={path} exists and is not a regular file; choose another output path")
        if not overwrite:
            raise InputError(f"output={path} already exists; pass overwrite=true to replace it or choose another path")
    return os.path.abspath(path)
