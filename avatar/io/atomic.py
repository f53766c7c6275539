"""Atomic file writes: write a hidden temporary in the same folder, fsync, then ``os.replace`` onto the target.

A reader never sees a half-written file, and a crash or exception leaves the previous version (or nothing)."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath


def _temp_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}")


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


@contextmanager
def atomic_path(path) -> Iterator:
    """Yield a temporary path in ``path``'s folder (same extension; a ``Path`` if ``path`` was one). On a clean exit
    it is renamed onto ``path``; on an exception it is removed and ``path`` is untouched."""
    target = os.fspath(path)
    tmp = _temp_for(target)
    try:
        yield Path(tmp) if isinstance(path, PurePath) else tmp
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
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


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    """Write ``obj`` as JSON (indent 2, trailing newline). NaN/inf become null; unknown types become ``str``."""
    text = json.dumps(_jsonable(obj), indent=2, default=str, allow_nan=False, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
