"""Reading checkpoint files safely, and telling a whole file from a truncated, corrupt or unsafe one.

Every check here reads headers only (the safetensors JSON header, the zip central directory of a torch ``.pt``), so a
26 GB checkpoint costs milliseconds. ``safe_torch_load`` is the one place a ``.pt`` is unpickled: tensors only
(``weights_only=True``); anything else is refused with a one-line ``BadCheckpoint`` that says to re-download the file.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from avatar.io.errors import InputError


class BadCheckpoint(InputError):
    """A weights file that cannot be used as it is; the message names the file, what is wrong, and says to
    re-download it."""


def _bad(path: Path, what: str) -> BadCheckpoint:
    return BadCheckpoint(f"{path} {what}; re-download it")


def unsafe(path: Path) -> BadCheckpoint:
    return BadCheckpoint(
        f"{path} is not a safe checkpoint (it holds pickled objects other than tensors); re-download it"
    )


# --- safetensors --------------------------------------------------------------------------------------------------


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """Tensor name -> ``{'dtype', 'shape', 'data_offsets'}`` from the file's JSON header, after checking that the file
    holds every byte the header promises. Raises ``BadCheckpoint``."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, f"is {size} bytes, not a safetensors file (truncated or corrupt)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100_000_000:
            raise _bad(path, f"is not a safetensors file (header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(path, "has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise _bad(path, "has a corrupt safetensors header")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            entry["shape"] = [int(d) for d in entry["shape"]]
            str(entry["dtype"])
        except (TypeError, KeyError, ValueError):
            raise _bad(path, f"has a corrupt safetensors header entry {name!r}") from None
        end = max(end, int(stop))
    expected = 8 + length + end
    if size < expected:
        raise _bad(path, f"is truncated ({size} bytes, its header describes {expected})")
    return header


# --- torch .pt (zip) ----------------------------------------------------------------------------------------------


def check_torch_file(path: str | Path) -> None:
    """A torch ``.pt`` is a zip archive: check its central directory and that every member lies inside the file
    (a truncated download loses the directory or members). Raises ``BadCheckpoint``."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        with path.open("rb") as fh:
            magic = fh.read(2)
        if magic == b"\x80\x02" or magic[:1] == b"\x80":
            # A legacy (pre-zip) torch.save pickle: readable only by unpickling it whole.
            return
        raise _bad(path, f"is truncated or corrupt ({size} bytes, not a torch checkpoint: no zip directory)") from None
    if not infos:
        raise _bad(path, "is an empty archive")
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise _bad(path, f"is truncated ({size} bytes; member {info.filename} ends past the end)")


def safe_torch_load(path: str | Path, *, mmap: bool = True):
    """``torch.load`` of tensors only (memory-mapped by default). Truncated, corrupt or unsafe files raise
    ``BadCheckpoint`` (one line; never advice to allow arbitrary pickles)."""
    path = Path(path)
    check_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise unsafe(path) from None
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # legacy non-zip format: no memory map
            return safe_torch_load(path, mmap=False)
        raise _bad(path, "is not a readable torch checkpoint (truncated or corrupt)") from None
    except (EOFError, OSError, ValueError, struct.error):
        raise _bad(path, "is not a readable torch checkpoint (truncated or corrupt)") from None


def read_json(path: str | Path) -> dict:
    """A JSON object file (configs, indexes); ``BadCheckpoint`` when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "is not valid JSON (truncated or corrupt)") from None
    if not isinstance(value, dict):
        raise _bad(path, "is not a JSON object")
    return value


def file_fingerprint_entry(path: Path, root: Path) -> str:
    """One line of a weights fingerprint: relative name, size, and (for safetensors) a hash of its header; for a
    ``.pt`` its zip directory (member names and sizes). Never reads tensor data."""
    import hashlib

    rel = path.relative_to(root).as_posix()
    size = path.stat().st_size
    digest = hashlib.sha256()
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                digest.update(fh.read(min(length, 100_000_000)))
        elif path.suffix in (".pt", ".bin", ".pth"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    digest.update(f"{info.filename}:{info.file_size}:{info.CRC}\n".encode())
        elif size <= 1_000_000:
            digest.update(path.read_bytes())
    except (OSError, struct.error, zipfile.BadZipFile):
        digest.update(b"unreadable")
    return f"{rel}\t{size}\t{digest.hexdigest()}"


def weights_fingerprint(weights_dir: str | Path) -> str | None:
    """A short hash of a weights folder: names, sizes and headers of its files (``None`` when there is no folder).
    Cheap: the tensor data is never read."""
    import hashlib

    root = Path(weights_dir)
    if not root.is_dir():
        return None
    lines = [
        file_fingerprint_entry(path, root)
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(root).parts
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
