"""Resume state: which jobs are done, the latest checkpoint of the job in progress, finished segments.

Layout under the state folder (``<output_dir>/.state/`` for batches, ``<output>.state/`` for a single run)::

    ids/<videoid>.json          the key a videoid last ran under, its input hashes and config (explains changes)
    jobs/<key>/job.json         what the key stands for (input hashes, config)
    jobs/<key>/done.json        written when the video is complete
    jobs/<key>/checkpoint.pt    the latest checkpoint of an unfinished job
    jobs/<key>/segments/<i>.pt  finished segments of the ``segments`` strategy

A job key is the sha256 of the input files' contents and the canonical JSON of the caller's config dict, so a changed
input or setting starts afresh. Every ``.pt`` is written atomically (temporary file, fsync, rename) behind a header
with the payload's length and sha256; a truncated or corrupted file is detected, logged and ignored. Only one process
(rank 0 or a data group's leader) writes a given key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Optional

from avatar.io.atomic import fsync_path
from avatar.io.errors import write_error

log = logging.getLogger(__name__)

#: First bytes of every checkpoint/segment file: ``MAGIC <sha256 hex> <payload bytes>\n`` then the payload.
MAGIC = b"AVATARSTATE1"

#: Dotted config keys that do not change the video's content (paths of outputs, resume/IO knobs).
NON_SEMANTIC_KEYS = (
    "output.path",
    "output_dir",
    "overwrite",
    "batch",
    "checkpoint_every",
    "save_intermediates",
    "image",
    "audio.path",
    "device",
    "serve",
)


def batch_state_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / ".state"


def single_state_dir(output: str | Path) -> Path:
    return Path(str(output) + ".state")


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (cached while its size and mtime are unchanged)."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def semantic_config(config: dict, drop: tuple[str, ...] = NON_SEMANTIC_KEYS) -> dict:
    """A copy of ``config`` without the dotted keys in ``drop``."""
    out = json.loads(json.dumps(config, default=str))
    for dotted in drop:
        node = out
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def canonical_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def job_key(inputs: dict[str, str | Path], config: dict) -> str:
    """sha256 over the content hashes of ``inputs`` (name → file path) and the canonical JSON of ``config``. The caller
    passes the config with non-semantic fields already removed (see ``semantic_config``)."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        digest.update(f"file {name} {file_sha256(inputs[name])}\n".encode())
    digest.update(b"config ")
    digest.update(canonical_json(config).encode())
    return digest.hexdigest()


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync, rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise write_error(err, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise
    fsync_path(path.parent)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable state file %s: %s", path, err)
        return None


def _write_payload(path: Path, payload: dict) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    header = MAGIC + f" {hashlib.sha256(data).hexdigest()} {len(data)}\n".encode()
    atomic_write_bytes(path, header + data)


def _read_payload(path: Path) -> Optional[dict]:
    """The payload, or None (with a warning) when the file is missing a valid header, truncated or corrupted."""
    import torch

    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    header, newline, data = blob.partition(b"\n")
    parts = header.split(b" ")
    if not newline or len(parts) != 3 or parts[0] != MAGIC:
        log.warning("ignoring %s: not a state file (bad header)", path)
        return None
    expected_sha, expected_len = parts[1].decode(errors="replace"), parts[2]
    if not expected_len.isdigit() or len(data) != int(expected_len):
        log.warning(
            "ignoring %s: truncated (%d of %s payload bytes)", path, len(data), expected_len.decode(errors="replace")
        )
        return None
    if hashlib.sha256(data).hexdigest() != expected_sha:
        log.warning("ignoring %s: checksum mismatch (corrupted)", path)
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class StateStore:
    """Resume state of the jobs of one output (see the module docstring for the layout)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _job_dir(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad job key {key!r}")
        return self.folder / "jobs" / key

    def _id_file(self, videoid: str) -> Path:
        return self.folder / "ids" / f"{videoid}.json"

    # --- keys and changes ---------------------------------------------------------------------------------------------

    def register(self, videoid: str, key: str, inputs: dict[str, str | Path], config: dict) -> Optional[str]:
        """Record that ``videoid`` now runs under ``key`` (with its input hashes and config). Returns why the key
        differs from the videoid's previous one (see ``explain_change``), or None when it is new or unchanged."""
        record = {
            "key": key,
            "files": {name: {"path": str(path), "sha256": file_sha256(path)} for name, path in inputs.items()},
            "config": config,
        }
        job_file = self._job_dir(key) / "job.json"
        if not job_file.exists():
            _write_json(job_file, record)
        reason = self.explain_change(videoid, key)
        _write_json(self._id_file(videoid), {"videoid": videoid, **record})
        return reason

    def explain_change(self, videoid: str, new_key: str) -> Optional[str]:
        """Why ``videoid`` no longer matches its previous key: which input files and config values changed
        (``config changed: sampling.steps 50 → 30``). None when there is no previous key or it is the same."""
        old = _read_json(self._id_file(videoid))
        if old is None or old.get("key") == new_key:
            return None
        new = _read_json(self._job_dir(new_key) / "job.json")
        if new is None:
            return "inputs or config changed"
        reasons = []
        old_files, new_files = old.get("files", {}), new.get("files", {})
        for name in sorted(set(old_files) | set(new_files)):
            before, after = old_files.get(name), new_files.get(name)
            if before is None or after is None:
                reasons.append(f"{name} {'added' if before is None else 'removed'}")
            elif before["sha256"] != after["sha256"]:
                renamed = f" ({before['path']} → {after['path']})" if before["path"] != after["path"] else ""
                reasons.append(f"{name} file changed{renamed}")
        old_cfg, new_cfg = _flatten(old.get("config", {})), _flatten(new.get("config", {}))
        changed = [
            f"{k} {old_cfg.get(k, '(unset)')} → {new_cfg.get(k, '(unset)')}"
            for k in sorted(set(old_cfg) | set(new_cfg))
            if old_cfg.get(k, "(unset)") != new_cfg.get(k, "(unset)")
        ]
        if changed:
            shown = ", ".join(changed[:5]) + (f", … {len(changed) - 5} more" if len(changed) > 5 else "")
            reasons.append(f"config changed: {shown}")
        return "; ".join(reasons) or "inputs or config changed"

    # --- done marks ---------------------------------------------------------------------------------------------------

    def is_done(self, key: str) -> bool:
        return _read_json(self._job_dir(key) / "done.json") is not None

    def mark_done(self, key: str, info: dict) -> None:
        """Mark the job complete and drop its checkpoint and segments (no longer needed)."""
        job_dir = self._job_dir(key)
        _write_json(job_dir / "done.json", info)
        (job_dir / "checkpoint.pt").unlink(missing_ok=True)
        shutil.rmtree(job_dir / "segments", ignore_errors=True)

    # --- checkpoints --------------------------------------------------------------------------------------------------

    def save_checkpoint(self, key: str, step: int, tensors: dict, meta: dict) -> Path:
        """Atomically replace the job's checkpoint: ``step`` completed steps, CPU copies of ``tensors``, plain ``meta``."""
        path = self._job_dir(key) / "checkpoint.pt"
        payload = {"step": int(step), "tensors": {k: v.detach().cpu() for k, v in tensors.items()}, "meta": meta}
        _write_payload(path, payload)
        log.debug("checkpoint saved at step %d (%s)", step, path)
        return path

    def load_checkpoint(self, key: str) -> Optional[tuple[int, dict, dict]]:
        """``(step, tensors, meta)`` of the latest valid checkpoint, or None."""
        payload = _read_payload(self._job_dir(key) / "checkpoint.pt")
        if payload is None:
            return None
        return payload["step"], payload["tensors"], payload["meta"]

    # --- segments -----------------------------------------------------------------------------------------------------

    def save_segment(self, key: str, index: int, tensors: dict, meta: Optional[dict] = None) -> Path:
        """Atomically store finished segment ``index`` (e.g. its denoised latents)."""
        path = self._job_dir(key) / "segments" / f"{int(index):06d}.pt"
        _write_payload(
            path,
            {"index": int(index), "tensors": {k: v.detach().cpu() for k, v in tensors.items()}, "meta": meta or {}},
        )
        return path

    def load_segment(self, key: str, index: int) -> Optional[tuple[dict, dict]]:
        payload = _read_payload(self._job_dir(key) / "segments" / f"{int(index):06d}.pt")
        if payload is None:
            return None
        return payload["tensors"], payload["meta"]

    def finished_segments(self, key: str) -> list[int]:
        """Indices of the segments stored intact (corrupt files are logged and left out)."""
        folder = self._job_dir(key) / "segments"
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(folder.glob("*.pt")):
            if path.stem.isdigit() and _read_payload(path) is not None:
                found.append(int(path.stem))
        return found

    def clear(self, key: str) -> None:
        """Forget everything about ``key`` (done mark, checkpoint, segments)."""
        shutil.rmtree(self._job_dir(key), ignore_errors=True)
