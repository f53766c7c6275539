"""Resume state: which jobs are done, the latest checkpoint of the job in progress, finished segments.

Layout under the state folder (``<output_dir>/.state/`` for batches, ``<output>.state/`` for a single run)::

    lock                        the owner's lock (``StateLock``): pid, host and start time of the run holding it
    ids/<videoid>.json          the key a videoid last ran under, its input hashes and config (explains changes)
    jobs/<key>/job.json         what the key stands for (input hashes, config)
    jobs/<key>/done.json        written when the video is complete
    jobs/<key>/checkpoint.pt    the latest checkpoint of an unfinished job
    jobs/<key>/segments/<i>.pt  finished segments of the ``segments`` strategy

A job key is the sha256 of the input files' contents and the canonical JSON of the caller's config dict, so a changed
input or setting starts afresh. Every ``.pt`` is written atomically (temporary file, fsync, rename) behind a header
with the payload's length and sha256; a truncated or corrupted file is detected, logged and ignored. Only one process
(rank 0 or a data group's leader) writes a given key.

One owner per output: a run takes ``fcntl.flock`` on ``<state folder>/lock`` before it builds a model or writes any
state (``lock_for_run``: rank 0 holds it, every rank learns the outcome together). A second run on the same output
refuses in one line naming the holder's pid and host (``OutputBusy``, exit 3), or with ``batch.wait_for_lock=true``
waits for it. The shards of a Slurm array share one ``output_dir``: each holds the folder's lock shared and its own
shard's exclusively (``StateLock``), so shards run side by side while a shard twice, or an unsharded run beside
them, is refused. flock belongs to the open file, so two runs in one process exclude each other too; it is released by
the kernel when the holder dies (a SIGKILL never leaves a stale lock); on NFS, Linux maps it to a POSIX lock that the
server arbitrates across hosts. Under the lock every temporary of the folder is stale (a killed checkpoint write's
``.checkpoint.pt.*.tmp``, an earlier run's summary parts): the owner removes them first (``remove_leftovers``; a
shard removes only those of processes that are gone).

The done mark keeps the video's report, so a rerun after a kill between the video's publish and its report writes
the missing report (``restore_report``) instead of rendering again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Optional

from avatar.io.atomic import fsync_path, is_temp_name, temp_name
from avatar.io.errors import InputError, OutputBusy, write_error

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
        tmp = temp_name(path, "tmp")  # .<name>.<host>-<pid>-<hex>.tmp
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
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

    def done_info(self, key: str) -> Optional[dict]:
        """What ``mark_done`` recorded (the output path, seconds, the report), or None."""
        return _read_json(self._job_dir(key) / "done.json")

    def mark_done(self, key: str, info: dict) -> None:
        """Mark the job complete and drop its checkpoint and segments (no longer needed). ``info`` holds the output
        and its ``report`` (``restore_report`` writes it again when a kill lost the report file)."""
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

    # --- leftovers ----------------------------------------------------------------------------------------------------

    def remove_leftovers(self, exclusive: bool = True) -> list[Path]:
        """Delete the temporaries of interrupted writes (``.<name>.*.tmp`` of checkpoints, segments, marks; atomic
        temporaries) and earlier runs' summary parts. ``exclusive``: the caller holds the folder's lock alone, so
        nothing else writes here and every one of them is stale. Otherwise (one shard of an array, beside others) only
        temporaries of processes that are gone (``avatar.io.atomic.stale_temp``). Returns the removed paths."""
        from avatar.io.atomic import stale_temp

        removed = []
        if not self.folder.is_dir():
            return removed
        for path in sorted(self.folder.rglob(".*")):
            name = path.name
            if not path.is_file():
                continue
            legacy = not is_temp_name(name) and name.endswith(".tmp") and name.count(".") >= 3  # mkstemp names
            if (exclusive and (is_temp_name(name) or legacy)) or stale_temp(path):
                path.unlink(missing_ok=True)
                removed.append(path)
        parts = self.folder / "summaries"
        if exclusive and parts.is_dir():
            for path in sorted(parts.glob("*.json")):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def restore_report(state: StateStore, key: str, output: str) -> Optional[str]:
    """A finished job whose ``<output>.json`` is missing (a kill after the video's publish, before its report): write
    it from the done mark. Returns what was done, for the log (None: the report is there, nothing to do)."""
    from avatar.io.atomic import atomic_write_json

    report_path = output + ".json"
    if os.path.exists(report_path):
        return None
    info = state.done_info(key) or {}
    if not isinstance(info.get("report"), dict):
        return (
            f"{output} is complete but its report {report_path} is missing and was not kept in the resume state "
            "(an older run); pass overwrite=true to render it again with a report"
        )
    written = atomic_write_json(report_path, info["report"], replace=False)
    return f"{output} was complete but its report was missing (the run was stopped in between); wrote {written}"


# --- one owner per output -----------------------------------------------------------------------------------------

LOCK_FILE = "lock"


def check_state_folder(folder: str | Path, field: str) -> None:
    """Validation: the resume state folder of an output, when it exists, must be a folder whose ``lock`` (when
    present) is a regular file. ``field`` names the output in the message (``output=x.mp4``)."""
    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise InputError(
            f"{field}: its resume state folder {folder} exists and is not a folder; remove or rename that file "
            "(this run keeps its checkpoints there)"
        )
    lock = folder / LOCK_FILE
    if os.path.lexists(lock) and not lock.is_file():
        raise InputError(f"{field}: {lock} exists and is not a regular file; remove it (it is this output's lock)")


def _flock(path: Path, mode: int) -> Optional[int]:
    """Open (creating) ``path`` and take ``mode`` (``LOCK_EX``/``LOCK_SH``) without blocking: the descriptor, or None
    when another open file holds a conflicting lock. A file that was removed or replaced meanwhile (a finished single
    render removes its state folder) is reopened."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(err, path) from None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise write_error(err, path) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _held(path: Path) -> bool:
    """Some open file holds a lock on ``path`` (probed with a shared lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


class StateLock:
    """The owner's lock of a state folder, held until ``release`` (or the process ends).

    A whole output takes ``LOCK_EX`` on ``<folder>/lock``. One shard of a Slurm array (``shard=(i, n)``) shares
    the folder with its sibling shards: ``LOCK_SH`` on ``lock`` (which keeps an unsharded run out) and ``LOCK_EX`` on
    ``lock.shard-<i>-of-<n>`` (which keeps the same shard from running twice)."""

    def __init__(self, folder: str | Path, what: str, shard: Optional[tuple[int, int]] = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.shard = shard
        self.shard_path = self.folder / f"{LOCK_FILE}.shard-{shard[0]}-of-{shard[1]}" if shard else None
        self.what = what if shard is None else f"{what} (shard {shard[0]} of {shard[1]})"
        self._fds: list[int] = []
        self._blocker: Optional[Path] = None

    @property
    def held(self) -> bool:
        return bool(self._fds)

    @property
    def exclusive(self) -> bool:
        """The whole folder is this run's (no sibling shard may write beside it)."""
        return self.shard is None

    def holders(self) -> list[dict]:
        """What the run(s) in the way wrote into their lock file (pid, host, since)."""
        if self._blocker is not None and self._blocker != self.path:
            return [_read_holder(self._blocker)]
        # held shared by the shards of an array: each one's record is in its own shard lock file
        shards = [_read_holder(p) for p in sorted(self.folder.glob(f"{LOCK_FILE}.shard-*")) if _held(p)]
        return shards or [_read_holder(self.path)]

    def busy_message(self) -> str:
        runs = []
        for who in self.holders():
            since = who.get("since")
            started = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
            shard = f", shard {who['shard']}" if who.get("shard") else ""
            runs.append(f"pid {who.get('pid', '?')} on host {who.get('host', '?')}{shard}{started}")
        return (
            f"{self.what} is in use by another run ({'; '.join(runs)}; lock {self._blocker or self.path}); wait for "
            "it to end, choose another output, or pass batch.wait_for_lock=true to wait for it"
        )

    def try_acquire(self) -> bool:
        """Take the lock without blocking; False when another run holds it (``busy_message`` names it)."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        fd = _flock(self.path, fcntl.LOCK_EX if self.shard is None else fcntl.LOCK_SH)
        if fd is None:
            self._blocker = self.path
            return False
        fds = [fd]
        if self.shard_path is not None:
            shard_fd = _flock(self.shard_path, fcntl.LOCK_EX)
            if shard_fd is None:
                os.close(fd)
                self._blocker = self.shard_path
                return False
            fds.append(shard_fd)
            record["shard"] = f"{self.shard[0]} of {self.shard[1]}"
        mine = fds[-1]  # the file only this run holds exclusively
        os.ftruncate(mine, 0)
        os.pwrite(mine, (json.dumps(record) + "\n").encode(), 0)
        self._fds, self._blocker = fds, None
        return True

    def release(self) -> None:
        fds, self._fds = self._fds, []
        for fd in reversed(fds):
            os.close(fd)  # closing the last descriptor of an open file releases its flock

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_for_run(
    topo,
    folder: str | Path,
    what: str,
    wait: bool = False,
    stop: Optional[Callable[[], bool]] = None,
    poll=1.0,
    shard: Optional[tuple[int, int]] = None,
) -> Optional[StateLock]:
    """Rank 0 of ``topo`` takes the output's lock and removes the folder's leftovers; rank 0's outcome is broadcast,
    so every rank raises ``OutputBusy`` together when another run holds it. ``wait``: retry every ``poll`` seconds
    (one small collective each time, never a long one) until it is free, or until ``stop()`` (asked on rank 0) says a
    signal asked to stop: then ``OutputBusy`` saying so. Returns the held lock on rank 0, None elsewhere."""
    lock = StateLock(folder, what, shard) if topo.is_main else None
    announced = False
    while True:
        status = None
        if lock is not None:
            if lock.try_acquire():
                status = ("held", "")
            elif not wait:
                status = ("busy", lock.busy_message())
            elif stop is not None and stop():
                status = ("busy", f"stopped while waiting: {lock.busy_message().split(';')[0]}; nothing was rendered")
            else:
                status = ("wait", lock.busy_message().split("; wait for")[0])
        kind, message = topo.broadcast_object(status)
        if kind == "held":
            break
        if kind == "busy":
            raise OutputBusy(message)
        if not announced and lock is not None:
            log.warning("%s; waiting for it to end (batch.wait_for_lock=true)", message)
        announced = True
        time.sleep(poll)
    if lock is not None:
        for path in StateStore(folder).remove_leftovers(exclusive=lock.exclusive):
            log.info("removed %s (left by an interrupted run)", path)
    return lock
