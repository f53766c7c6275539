"""User-input errors (one line naming the file, field or value and what would be valid) and write faults (one line
naming the path and the cause)."""

from __future__ import annotations

import errno
import os

#: Exit code of the entry points for bad input (checked before any model is built).
EXIT_BAD_INPUT = 2
#: Exit code when a write failed (disk full, quota, read-only, permissions), the output was taken meanwhile, or
#: another run holds the output's lock.
EXIT_WRITE_FAILED = 3

#: errno values that mean "this storage cannot take the write", reported as one line instead of a traceback.
WRITE_ERRNOS = frozenset(
    code
    for code in (
        errno.ENOSPC,
        getattr(errno, "EDQUOT", None),
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EFBIG,
        errno.ENAMETOOLONG,
    )
    if code is not None
)


class InputError(ValueError):
    """Bad user input. ``str(err)`` is the one-line message shown to the user."""


class OutputConflict(RuntimeError):
    """Something appeared at the output path while this run rendered: it was kept, and this run's result was
    published under a sibling name instead. ``str(err)`` names both paths."""

    def __init__(self, target: str, kept_as: str) -> None:
        self.target, self.kept_as = target, kept_as
        super().__init__(
            f"{target} appeared while this run was rendering and was left untouched; this run's result is at {kept_as}"
        )


class OutputBusy(RuntimeError):
    """Another run holds this output's lock (``avatar.pipeline.state.StateLock``); ``str(err)`` names its pid and
    host."""


class WriteError(OSError):
    """A write fault with the path it happened on; ``str(err)`` is one line."""

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno or 0, "")
        cause = os.strerror(self.errno) if self.errno else (self.strerror or "write failed")
        return f"cannot write {self.filename}: {cause}{f' ({name})' if name else ''}"


def write_error(err: OSError, path) -> OSError:
    """``err`` with ``path`` attached (writes through an open file raise without a file name)."""
    if isinstance(err, WriteError):
        return err
    if err.errno not in WRITE_ERRNOS:
        return err
    return WriteError(err.errno, err.strerror or os.strerror(err.errno), os.fspath(err.filename or path))
