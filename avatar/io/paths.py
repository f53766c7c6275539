"""The one check of an input path that needs no model: it exists, is a regular file (never opened when it is a FIFO,
device or folder) and is readable. The readers of images, audio and manifests call it; every other rule is in
``avatar.validate``."""

from __future__ import annotations

import os
import stat

from avatar.io.errors import InputError


def check_input_file(path: str, field: str, what: str) -> os.stat_result:
    """``path`` must exist and be a regular file (a FIFO, device or folder is refused from its ``stat``, without
    opening it). Returns its ``stat``. A path with a newline or another control character is shown quoted, so the
    message stays one line."""
    shown = path if str(path).isprintable() else repr(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{field}={shown}: file not found; give the path of {what}") from None
    except OSError as err:
        raise InputError(f"{field}={shown}: cannot be read ({err.strerror}); give the path of {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{field}={shown}: is a directory; give the path of {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket, not a regular file"
        raise InputError(f"{field}={shown}: is {kind}; give the path of {what}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{field}={shown}: is not readable (permission denied); give the path of {what}")
    return st
