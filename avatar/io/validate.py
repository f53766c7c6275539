"""Checks of single values that need no model: sampling steps, seeds, input files, the output path. The one
validation that combines them with every cross-field rule is ``launch.validate.validate``."""

from __future__ import annotations

import numbers
import os
import stat
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


def check_seed(seed, field: str = "seed") -> int:
    """A seed is an integer from 0 to ``SEED_MAX`` (2**63 - 2)."""
    from avatar.config import SEED_MAX

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"{field}={seed!r} is invalid; give an integer from 0 to {SEED_MAX} (2**63 - 2)")
    return int(seed)


def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def name_max(folder: str) -> int:
    """Longest file name (bytes) the file system of ``folder`` allows."""
    try:
        return int(os.pathconf(_existing_ancestor(folder), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def file_identity(path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` resolves to (symlinks followed; hard links share it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_not_an_input(path, inputs: dict) -> None:
    """Refuse an output path that is one of this run's inputs: ``inputs`` maps ``field=path`` labels to paths; the
    same file by inode (symlinks and hard links included) is refused whatever ``overwrite`` says."""
    target = file_identity(path)
    if target is None:
        return
    for label, input_path in inputs.items():
        if input_path and file_identity(input_path) == target:
            raise InputError(
                f"output={path} is the same file as {label}={input_path} (an input of this run); writing it would "
                "destroy the input, so choose another output path"
            )


def check_output_path(path, overwrite: bool, inputs: dict | None = None, folder_may_be_missing: bool = False) -> str:
    """The output must be a ``.mp4`` file path in an existing, writable folder (``folder_may_be_missing``: a folder
    that this run will create under a writable one); an existing file needs ``overwrite=true``; none of the files
    the run writes beside it may be one of its ``inputs``; the longest temporary name must fit the file system.
    Returns the absolute path. Creates nothing."""
    from avatar.io.atomic import longest_derived_name

    if path is None or os.fspath(path) == "":
        raise InputError("output is empty; give output=PATH.mp4")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"output={path} is a directory; give a file path ending in .mp4")
    if not path.lower().endswith(".mp4"):
        raise InputError(f"output={path} must end in .mp4 (the writer produces H.264/AAC mp4)")
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    longest = longest_derived_name(name)
    limit = name_max(folder)
    if len(os.fsencode(longest)) > limit:
        raise InputError(
            f"output={path}: the name is too long ({len(os.fsencode(name))} bytes); this run also writes "
            f"temporaries and siblings up to {len(os.fsencode(longest)) - len(os.fsencode(name))} bytes longer and "
            f"the file system allows {limit}-byte names; choose a name of at most "
            f"{limit - (len(os.fsencode(longest)) - len(os.fsencode(name)))} bytes"
        )
    probe_folder = folder
    if not os.path.exists(folder):
        if not folder_may_be_missing:
            raise InputError(
                f"output={path}: the folder {folder} does not exist; create it first or choose another path"
            )
        probe_folder = _existing_ancestor(folder)
    if not os.path.isdir(probe_folder):
        raise InputError(f"output={path}: {probe_folder} is not a folder; choose another output path")
    if not os.access(probe_folder, os.W_OK | os.X_OK):
        raise InputError(f"output={path}: the folder {probe_folder} is not writable; choose a writable output folder")
    try:
        # a real probe (ACLs, read-only mounts); O_TMPFILE where available, so nothing ever appears in the folder
        with tempfile.TemporaryFile(dir=probe_folder):
            pass
    except OSError as err:
        raise InputError(
            f"output={path}: cannot write in {probe_folder} ({err.strerror or err}); choose another folder"
        ) from err
    for derived in (path, path + ".json", path + ".intermediates.pt"):
        check_not_an_input(derived, inputs or {})
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise InputError(f"output={path} exists and is not a regular file; choose another output path")
        if not overwrite:
            raise InputError(f"output={path} already exists; pass overwrite=true to replace it or choose another path")
    return os.path.abspath(path)


def check_input_file(path: str, field: str, what: str) -> os.stat_result:
    """``path`` must exist and be a regular file (a FIFO, device or folder is refused from its ``stat``, without
    opening it). Returns its ``stat``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{field}={path}: file not found; give the path of {what}") from None
    except OSError as err:
        raise InputError(f"{field}={path}: cannot be read ({err.strerror}); give the path of {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{field}={path}: is a directory; give the path of {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket, not a regular file"
        raise InputError(f"{field}={path}: is {kind}; give the path of {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{field}={path}: is not readable (permission denied); give the path of {what}")
    return st
