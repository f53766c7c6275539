"""Atomic outputs: write a hidden temporary in the same folder, fsync, then publish it at the target.

A reader never sees a half-written file, and a crash or exception leaves the previous version (or nothing). Publishing
never replaces what appeared at the target meanwhile (``publish``: a hard link, which fails if the name exists, or
``renameat2(RENAME_NOREPLACE)``): the existing file is kept and ours goes to ``<target>.conflict-<id><ext>``. Only
``replace=True`` (``overwrite=true``, or files inside this run's own folders) replaces, atomically.

Temporaries are named ``.<name>.<host>-<pid>-<hex>.<tag>``; ``remove_stale_temps`` deletes those of processes of
this host that no longer run (a SIGKILL leaves them), so the next run on the same output cleans up.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from avatar.io.errors import write_error

#: This process's run id: names its conflict siblings (``out.mp4.conflict-<RUN_ID>.mp4``).
RUN_ID = secrets.token_hex(4)
#: Short tag of this host in temporary names (a dead pid is only meaningful on its own host).
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
#: Temporaries of other hosts older than this are stale too.
STALE_SECONDS = 24 * 3600
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)-[0-9a-f]{8}\.[A-Za-z0-9.]+$")


def temp_name(path, tag: str = "tmp") -> str:
    """A hidden temporary beside ``path``: ``.<name>.<host>-<pid>-<hex>.<tag>``."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.{HOST}-{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def is_temp_name(name: str) -> bool:
    """``name`` (a file name) is one of ``temp_name``'s temporaries."""
    return _TEMP_RE.match(name) is not None


def conflict_name(path, run_id: str = RUN_ID) -> str:
    """``out.mp4`` → ``out.mp4.conflict-<id>.mp4``: where this run's result goes when ``out.mp4`` was taken."""
    path = os.fspath(path)
    return f"{path}.conflict-{run_id}{os.path.splitext(path)[1]}"


def longest_derived_name(name: str) -> str:
    """The longest file name this run may create for an output named ``name`` (the temporary of the report of a
    conflict sibling), with every variable part at its widest. Validation checks it fits the file system."""
    sibling = conflict_name(name, "f" * 8) + ".json"
    return f".{sibling}.{'f' * 6}-{'9' * 7}-{'f' * 8}.mux.mp4"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp(path) -> bool:
    """``path`` is a temporary (``temp_name``) of a process that no longer runs (this host) or, from another host,
    older than ``STALE_SECONDS``."""
    m = _TEMP_RE.match(os.path.basename(os.fspath(path)))
    if not m or (m["host"] == HOST and int(m["pid"]) == os.getpid()):
        return False
    if m["host"] == HOST:
        return not _pid_alive(int(m["pid"]))
    try:
        return time.time() - os.lstat(path).st_mtime > STALE_SECONDS
    except OSError:
        return False


def remove_stale_temps(path) -> list[str]:
    """Delete the temporaries of ``path`` left by killed processes (this host: pid gone; other hosts: older than a
    day). Returns the removed paths."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if not m or m["name"] != name or int(m["pid"]) == os.getpid():
            continue
        full = os.path.join(folder, entry)
        if m["host"] == HOST:
            stale = not _pid_alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - os.lstat(full).st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            try:
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    return removed


def fsync_path(path) -> None:
    """fsync a file or a folder by path (best effort: some filesystems refuse folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1


def _rename_noreplace(src: str, dst: str) -> None:
    """``renameat2(RENAME_NOREPLACE)``: fails with EEXIST if ``dst`` exists (for file systems without hard links)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", dst)
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def _link_noreplace(src: str, dst: str) -> None:
    """Make ``src`` appear at ``dst`` unless ``dst`` exists (EEXIST); ``src`` is gone afterwards."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        _rename_noreplace(src, dst)  # no hard links here
        return
    os.unlink(src)


def publish(tmp, target, replace: bool = False) -> str:
    """Move the finished temporary ``tmp`` to ``target``; returns where it went. ``replace``: atomically replace
    ``target``. Otherwise ``target`` is never replaced: if it exists (also if it appeared a moment ago), ``tmp``
    goes to ``conflict_name(target)`` and that path is returned."""
    tmp, target = os.fspath(tmp), os.fspath(target)
    try:
        if replace:
            os.replace(tmp, target)
            final = target
        else:
            try:
                _link_noreplace(tmp, target)
                final = target
            except FileExistsError:
                final = conflict_name(target)
                _link_noreplace(tmp, final)
    except OSError as err:
        raise write_error(err, target) from None
    fsync_path(os.path.dirname(os.path.abspath(target)))
    return final


@contextmanager
def atomic_path(path, replace: bool = True, published: list | None = None) -> Iterator:
    """Yield a temporary path in ``path``'s folder (a ``Path`` if ``path`` was one). On a clean exit it is published
    at ``path`` (``replace=False``: never over a file that exists; see ``publish``); on an exception it is removed
    and ``path`` is untouched. Write faults (disk full, read-only, ...) are raised naming ``path``. The path it was
    published at is appended to ``published``."""
    target = os.fspath(path)
    ext = os.path.splitext(target)[1].lstrip(".") or "tmp"
    tmp = temp_name(target, ext)
    try:
        yield Path(tmp) if isinstance(path, PurePath) else tmp
        fsync_path(tmp)
        final = publish(tmp, target, replace=replace)
        if published is not None:
            published.append(final)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise write_error(err, target) from None
        raise


def _jsonable(obj):
    """Recursively turn ``obj`` into JSON-safe values: NaN/±inf → None, numpy/torch scalars and arrays → Python,
    paths and other objects → str (via ``default``), non-string keys → str."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                key = str(key)
            out[key] = _jsonable(value)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays/scalars, torch tensors
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        try:
            return _jsonable(tolist())
        except Exception:  # noqa: BLE001 - fall back to str()
            return str(obj)
    return obj


def atomic_write_text(path, text: str, encoding: str = "utf-8", replace: bool = True) -> str:
    """Write ``text`` atomically; returns the path it was published at (see ``publish`` for ``replace=False``)."""
    published: list = []
    with atomic_path(path, replace, published) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)
    return published[0]


def atomic_write_json(path, obj, replace: bool = True) -> str:
    """Write ``obj`` as JSON (indent 2, trailing newline). NaN/inf become null; unknown types become ``str``.
    Returns the path it was published at."""
    text = json.dumps(_jsonable(obj), indent=2, default=str, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n", replace=replace)


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
