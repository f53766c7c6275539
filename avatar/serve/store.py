"""The server's durable job store: one interface, two databases (SQLite, embedded; PostgreSQL, shared), plus the
uploads, results and resume state under the data folder every API front end and worker sees.

``serve.store`` picks the database::

    sqlite:///outputs/serve/jobs.sqlite3      a file (relative path; sqlite:////abs/path for an absolute one)
    postgresql://user@host:5432/avatar        PostgreSQL through psycopg 3 (any libpq URI; postgres:// too)

Layout under ``serve.data_dir`` (shared storage: every worker reads the uploads and writes results there)::

    uploads/<id>/image        the uploaded portrait (the client's file name is kept only as text in the row)
    uploads/<id>/audio        the uploaded speech
    results/<id>.mp4          the finished video (and <id>.mp4.json, its run report; <id>.mp4.segments/, the
                              finished stretches of a ``segments`` job)
    resume/<id>/              the renderer's resume state of an unfinished job (step checkpoints)

Both databases get the same schema from ``avatar/serve/migrations/NNN_*.sql``, applied in order at open and recorded
in ``schema_version`` (under a lock, so servers starting together migrate once). A job goes ``queued → in_progress →
completed | failed | cancelled``. A worker claims the oldest queued job with a **lease** (``lease_owner``, a fresh
``lease_token``, ``lease_expires``): PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED`` (claimers never wait on each
other's row), SQLite ``BEGIN IMMEDIATE`` (one writer at a time, across processes). The worker heartbeats while it
renders; a lease that expired (a dead or cut-off worker) puts the job back in its place in the queue and the next
worker resumes it from its last checkpoint. Every update a worker makes (progress, heartbeat, succeed, fail,
requeue) is conditional on its token: a worker that lost its lease can never finish, fail or requeue a job another
worker holds or has finished. Times come from the database's clock, so the workers' clocks need not agree.

Any database or file-system fault of the store is raised as ``StoreError`` (one line, the URL without its password),
never as a driver exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import socket
import sqlite3
import threading
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

log = logging.getLogger(__name__)

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
ACTIVE = ("queued", "in_progress")
FINAL = ("completed", "failed", "cancelled")

#: Job ids the store hands out: ``vid_`` and 24 hex digits. Anything else is not a job (and never a path).
ID_PATTERN = re.compile(r"^vid_[0-9a-f]{24}$")

#: What a heartbeat or a progress update answers: the lease holds, it was lost (the job is someone else's now, or
#: finished), or a cancel was asked for.
HOLDS, LOST, CANCEL = "holds", "lost", "cancel"

#: File systems whose locks SQLite cannot trust (two servers on one file there could both claim a job).
NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs")

#: Columns a caller never sees from ``get``/``list`` (the token is the lease holder's secret).
_PRIVATE = ("seq", "lease_token", "report", "params", "eta_at", "cancel_requested")


class StoreError(OSError):
    """The job store failed (database unreachable, full, read-only or corrupt): one line, no secret. An ``OSError``:
    to a caller it is a storage fault like a failed file write (the API answers 503)."""


def new_id() -> str:
    return "vid_" + secrets.token_hex(12)


def worker_name() -> str:
    """This process as a lease owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def default_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir) / 'jobs.sqlite3'}"


def redact(url: str) -> str:
    """``url`` without its password (for logs and error lines)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def check_url(url: str) -> str:
    """The backend of a ``serve.store`` URL (``sqlite`` or ``postgresql``); raises ValueError naming what is valid."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        if not sqlite_path(url):
            raise ValueError(f"serve.store={url} names no file; give sqlite:///relative/path or sqlite:////abs/path")
        return "sqlite"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    raise ValueError(
        f"serve.store={redact(url)} is not a store URL; give sqlite:///PATH (one machine) or "
        "postgresql://USER@HOST:PORT/DB (shared by many)"
    )


def sqlite_path(url: str) -> str:
    return unquote(url.partition("://")[2].removeprefix("/").split("?")[0])


def filesystem_type(path: str | Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts; '' when unknown)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every migration shipped in ``avatar/serve/migrations``, in order."""
    found = []
    for entry in resources.files("avatar.serve").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{3})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"avatar/serve/migrations: versions {versions} are not 1..N without gaps")
    return found


def _statements(sql: str) -> list[str]:
    """The statements of a migration file (``--`` comments dropped; statements end with ``;``)."""
    text = "\n".join(line.split("--")[0] for line in sql.splitlines())
    return [s.strip() for s in text.split(";") if s.strip()]


# --- the two databases ------------------------------------------------------------------------------------------


class _Sqlite:
    """One connection (WAL journal, ``synchronous=FULL``); write transactions are ``BEGIN IMMEDIATE``, so two
    processes on one file take turns (each waits up to ``busy_seconds`` for the other)."""

    name = "sqlite"
    seq = "INTEGER PRIMARY KEY AUTOINCREMENT"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    for_update = ""
    skip_locked = ""
    errors: tuple = (sqlite3.Error,)

    def __init__(self, url: str, busy_seconds: float = 30.0) -> None:
        self.url = url
        path = Path(sqlite_path(url))
        kind = filesystem_type(path.parent if path.parent.exists() else ".")
        if kind in NETWORK_FILESYSTEMS:
            raise StoreError(
                f"serve.store={url} is on a {kind} file system, where SQLite's locks are not safe for several "
                "servers; use serve.store=postgresql://... (or a local disk for one server)"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"serve.store={url}: cannot create {path.parent} ({err.strerror or err})") from None
        self.path = path
        self.busy_seconds = busy_seconds
        self.db = None

    def connect(self) -> None:
        db = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        self.db = db

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    @contextmanager
    def transaction(self, lock_key: int | None = None):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a failed COMMIT (disk full) may have rolled back already
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def execute(self, sql: str, args: tuple = ()):
        return self.db.execute(sql, args)

    def rows(self, sql: str, args: tuple = ()) -> list[dict]:
        return [dict(row) for row in self.db.execute(sql, args).fetchall()]

    def has_table(self, name: str) -> bool:
        found = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return found is not None


class _Postgres:
    """One psycopg 3 connection in autocommit mode; ``transaction()`` is one explicit transaction (with an advisory
    lock for migrations). A lost connection is opened again at the next call."""

    name = "postgresql"
    seq = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    now = "(EXTRACT(EPOCH FROM clock_timestamp())::double precision)"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, connect_seconds: int = 10) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError(
                f"serve.store={redact(url)} needs the psycopg package: pip install 'psycopg[binary]'"
            ) from None
        self.psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.url = url
        self.connect_seconds = connect_seconds
        self.db = None

    def connect(self) -> None:
        from psycopg.rows import dict_row

        self.db = self.psycopg.connect(
            self.url, autocommit=True, row_factory=dict_row, connect_timeout=self.connect_seconds
        )

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            finally:
                self.db = None

    @contextmanager
    def transaction(self, lock_key: int | None = None):
        with self.db.transaction():
            if lock_key is not None:
                self.db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
            yield

    def execute(self, sql: str, args: tuple = ()):
        return self.db.execute(sql.replace("?", "%s"), args)

    def rows(self, sql: str, args: tuple = ()) -> list[dict]:
        return self.execute(sql, args).fetchall()

    def has_table(self, name: str) -> bool:
        return self.execute("SELECT to_regclass(?) AS t", (name,)).fetchone()["t"] is not None


#: Key of the advisory lock that serialises migrations on PostgreSQL (any constant; "avatar" in ASCII).
_MIGRATION_LOCK = 0x617661746172


class JobStore:
    """Jobs in the database named by ``url`` (default: ``sqlite:///<data_dir>/jobs.sqlite3``), files under
    ``data_dir``. Thread-safe: one connection behind a lock (open one store per thread that must not wait on the
    others, e.g. the worker beside the HTTP threads)."""

    def __init__(self, data_dir: str | Path, url: str | None = None) -> None:
        self.root = Path(data_dir)
        self.url = url or default_url(self.root)
        try:
            for sub in ("uploads", "results", "resume"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"serve.data_dir={self.root} cannot be created: {err.strerror or err}") from None
        try:
            kind = check_url(self.url)
        except ValueError as err:
            raise StoreError(str(err)) from None
        self._backend = _Sqlite(self.url) if kind == "sqlite" else _Postgres(self.url)
        self.backend = self._backend.name
        self._lock = threading.Lock()
        with self._guard():  # connects
            self._migrate()

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    # --- schema ---------------------------------------------------------------------------------------------------

    def schema_version(self) -> int:
        with self._guard():
            if not self._backend.has_table("schema_version"):
                return 0
            return int(self._backend.rows("SELECT MAX(version) AS v FROM schema_version")[0]["v"] or 0)

    def _migrate(self) -> None:
        """Apply the migrations this database has not seen, in order, in one locked transaction."""
        db = self._backend
        known = migrations()
        with db.transaction(lock_key=_MIGRATION_LOCK):
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"
            )
            current = int(db.rows("SELECT MAX(version) AS v FROM schema_version")[0]["v"] or 0)
            if current > len(known):
                raise StoreError(
                    f"serve.store={redact(self.url)} has schema version {current}; this version of the code knows "
                    f"up to {len(known)}: upgrade the code (or point serve.store at another database)"
                )
            if current == 0 and db.has_table("jobs"):
                raise StoreError(
                    f"serve.store={redact(self.url)} holds a jobs table of an older server (no schema_version); "
                    "move that file away or give another serve.store"
                )
            for version, name, sql in known[current:]:
                for statement in _statements(sql.replace("$SEQ", db.seq)):
                    db.execute(statement)
                db.execute(
                    f"INSERT INTO schema_version (version, name, applied) VALUES (?, ?, {db.now})", (version, name)
                )
                log.info("job store %s: applied migration %03d_%s", redact(self.url), version, name)

    # --- paths (from the id only, never from anything a client sent) ------------------------------------------------

    def upload_dir(self, job_id: str) -> Path:
        return self.root / "uploads" / _checked(job_id)

    def result_path(self, job_id: str) -> Path:
        return self.root / "results" / f"{_checked(job_id)}.mp4"

    def resume_dir(self, job_id: str) -> Path:
        return self.root / "resume" / _checked(job_id)

    def staging_dir(self, job_id: str) -> Path:
        """Where an upload is written and validated before the job exists."""
        return self.root / "uploads" / f".incoming-{_checked(job_id)}"

    def segments_dir(self, job_id: str) -> Path:
        """Where the ``segments`` strategy writes a job's finished segments (``manifest.json`` lists them)."""
        return Path(f"{self.result_path(job_id)}.segments")

    def report_path(self, job_id: str) -> Path:
        """The full run report beside the video."""
        return Path(f"{self.result_path(job_id)}.json")

    def free_files(self, job_id: str) -> None:
        """Remove everything stored for a job: upload, resume state, video, report, segments, temporaries."""
        result = self.result_path(job_id)
        paths = [self.upload_dir(job_id), self.staging_dir(job_id), self.resume_dir(job_id)]
        paths += [*result.parent.glob(f"{job_id}.mp4*"), *result.parent.glob(f".{job_id}.mp4*")]
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # --- the API's writes ------------------------------------------------------------------------------------------

    def add(
        self,
        job_id: str,
        *,
        prompt: str,
        seed: int,
        steps: int,
        image_name: str,
        audio_name: str,
        max_active: int | None = None,
        params: dict | None = None,
    ) -> bool:
        """Queue a job whose files are already in ``upload_dir(job_id)``. With ``max_active``, refuse (return
        False) when that many jobs are already queued or in progress. ``params``: further per-job settings (JSON)."""
        db = self._backend
        with self._guard(), db.transaction():
            if max_active is not None and self._count_active() >= max_active:
                return False
            db.execute(
                "INSERT INTO jobs (id, status, created, prompt, seed, steps, image_name, audio_name, total, params)"
                f" VALUES (?, 'queued', {db.now}, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, prompt, seed, steps, image_name, audio_name, steps, json.dumps(params or {})),
            )
        return True

    def request_cancel(self, job_id: str) -> str | None:
        """``DELETE`` of an unfinished job: a queued one is ``cancelled`` at once (its files freed), one in progress is
        flagged and stops at its worker's next step (the worker frees its files). Returns the status after (None: no
        such job); a finished job is left as it is."""
        if not ID_PATTERN.match(job_id or ""):
            return None
        db = self._backend
        with self._guard(), db.transaction():
            found = db.rows(f"SELECT status FROM jobs WHERE id = ?{db.for_update}", (job_id,))
            if not found:
                return None
            status = found[0]["status"]
            if status == "queued":
                db.execute(
                    f"UPDATE jobs SET status = 'cancelled', finished = {db.now}, cancel_requested = 1, eta_at = NULL"
                    " WHERE id = ?",
                    (job_id,),
                )
                status = "cancelled"
            elif status == "in_progress":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        if status == "cancelled":
            self.free_files(job_id)
        return status

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a ``DELETE`` asked to stop this job."""
        with self._guard():
            rows = self._backend.rows("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def set_segments(self, job_id: str, count: int | None) -> None:
        """How many segments the job renders (``segments`` strategy; the worker's percent counts its rounds)."""
        with self._guard():
            self._backend.execute("UPDATE jobs SET segments = ? WHERE id = ?", (count, job_id))

    def delete(self, job_id: str) -> bool:
        """Forget a finished (completed, failed or cancelled) job; its files are ``free_files``'s. Returns whether a
        row went."""
        with self._guard():
            cur = self._backend.execute(
                "DELETE FROM jobs WHERE id = ? AND status IN ('completed', 'failed', 'cancelled')", (job_id,)
            )
            return cur.rowcount == 1

    # --- the worker's writes (each names the lease token it got from claim_next) -------------------------------------

    def claim_next(self, owner: str | None = None, lease_seconds: float = 60.0) -> dict | None:
        """The oldest queued job, now ``in_progress`` under a lease of ``lease_seconds`` held by ``owner`` (None when
        the queue is empty). Jobs whose lease expired are put back in their place first (and a cancelled one among
        them is finished as cancelled). The returned job carries ``lease_token``."""
        db = self._backend
        owner = owner or worker_name()
        token = secrets.token_hex(16)
        with self._guard(), db.transaction():
            expired = db.rows(
                f"SELECT id, lease_owner, cancel_requested FROM jobs WHERE status = 'in_progress' AND lease_expires < "
                f"{db.now} ORDER BY seq{db.skip_locked}"
            )
            for row in expired:
                finished = f"'cancelled', finished = {db.now}" if row["cancel_requested"] else "'queued'"
                db.execute(
                    f"UPDATE jobs SET status = {finished}, lease_owner = NULL, lease_token = NULL,"
                    " lease_expires = NULL, eta_at = NULL WHERE id = ?",
                    (row["id"],),
                )
            found = db.rows(f"SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1{db.skip_locked}")
            if found:
                db.execute(
                    f"UPDATE jobs SET status = 'in_progress', started = COALESCE(started, {db.now}),"
                    f" attempts = attempts + 1, lease_owner = ?, lease_token = ?, lease_expires = {db.now} + ?,"
                    " eta_at = NULL WHERE id = ?",
                    (owner, token, float(lease_seconds), found[0]["id"]),
                )
                found = db.rows(f"SELECT *, {db.now} AS now FROM jobs WHERE id = ?", (found[0]["id"],))
        for row in expired:
            if row["cancel_requested"]:
                self.free_files(row["id"])
                log.warning("job %s: the lease of %s expired; it had been cancelled", row["id"], row["lease_owner"])
            else:
                log.warning("job %s: the lease of %s expired; the job is queued again", row["id"], row["lease_owner"])
        if not found:
            return None
        return self._public(found[0]) | {"lease_token": token}

    def heartbeat(self, job_id: str, *, token: str, lease_seconds: float = 60.0) -> str:
        """Extend the lease: ``HOLDS``, ``CANCEL`` (extended; a cancel was asked for) or ``LOST`` (not ours)."""
        db = self._backend
        with self._guard():
            cur = db.execute(
                f"UPDATE jobs SET lease_expires = {db.now} + ? WHERE id = ? AND lease_token = ?"
                " AND status = 'in_progress'",
                (float(lease_seconds), job_id, token),
            )
            if cur.rowcount != 1:
                return LOST
            return self._verdict(job_id, token)

    def progress(
        self,
        job_id: str,
        step: int,
        total: int,
        *,
        token: str,
        percent: int | None = None,
        eta_at: float | None = None,
    ) -> str:
        """Denoising step ``step`` of ``total`` of the current pass is done (after every step); ``percent``: of the
        whole job (0-99; 100 is for the published video); ``eta_at``: when the denoising should end (seconds since
        the epoch). Answers like ``heartbeat``."""
        percent = min(99, int(100 * step / max(1, total))) if percent is None else min(99, int(percent))
        with self._guard():
            cur = self._backend.execute(
                "UPDATE jobs SET step = ?, total = ?, percent = ?, eta_at = ? WHERE id = ? AND lease_token = ?"
                " AND status = 'in_progress'",
                (step, total, percent, eta_at, job_id, token),
            )
            if cur.rowcount != 1:
                return LOST
            return self._verdict(job_id, token)

    def succeed(self, job_id: str, report: dict, *, token: str) -> bool:
        """The job is done (its video published). False when the lease was lost: another worker holds the job or
        has finished it, and nothing changes."""
        db = self._backend
        resumed = (report.get("denoise") or {}).get("resumed_from_step")
        with self._guard():
            cur = db.execute(
                f"UPDATE jobs SET status = 'completed', finished = {db.now}, step = total, percent = 100, resumed_from_step = ?,"
                " report = ?, error = NULL, eta_at = NULL, lease_token = NULL, lease_expires = NULL"
                " WHERE id = ? AND lease_token = ? AND status = 'in_progress'",
                (resumed, json.dumps(report_summary(report)), job_id, token),
            )
            return cur.rowcount == 1

    def fail(self, job_id: str, error: str, *, token: str) -> bool:
        """The job failed. False (nothing changes) when the lease was lost: a job another worker finished is never
        marked failed."""
        db = self._backend
        with self._guard():
            cur = db.execute(
                f"UPDATE jobs SET status = 'failed', finished = {db.now}, error = ?, eta_at = NULL,"
                " lease_token = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ? AND status = 'in_progress'",
                (" ".join(str(error).split())[:2000], job_id, token),
            )
            return cur.rowcount == 1

    def requeue(self, job_id: str, checkpoint_step: int | None, *, token: str) -> bool:
        """A preempted job: back to ``queued`` in its place, to resume from ``checkpoint_step``."""
        with self._guard():
            cur = self._backend.execute(
                "UPDATE jobs SET status = 'queued', checkpoint_step = ?, eta_at = NULL, lease_owner = NULL,"
                " lease_token = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ? AND status = 'in_progress'",
                (checkpoint_step, job_id, token),
            )
            return cur.rowcount == 1

    def mark_cancelled(self, job_id: str, step: int | None, *, token: str) -> bool:
        """The worker stopped a job whose cancel was asked for, after ``step``: ``cancelled``, files freed."""
        db = self._backend
        with self._guard():
            cur = db.execute(
                f"UPDATE jobs SET status = 'cancelled', finished = {db.now}, step = COALESCE(?, step), eta_at = NULL,"
                " lease_token = NULL, lease_expires = NULL WHERE id = ? AND lease_token = ? AND status = 'in_progress'",
                (step, job_id, token),
            )
            done = cur.rowcount == 1
        if done:
            self.free_files(job_id)
        return done

    def requeue_expired(self) -> list[str]:
        """Jobs whose lease expired, queued again now (``claim_next`` does the same before each claim)."""
        db = self._backend
        with self._guard(), db.transaction():
            rows = db.rows(
                f"SELECT id FROM jobs WHERE status = 'in_progress' AND lease_expires < {db.now} AND"
                f" cancel_requested = 0 ORDER BY seq{db.skip_locked}"
            )
            for row in rows:
                db.execute(
                    "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_token = NULL, lease_expires = NULL,"
                    " eta_at = NULL WHERE id = ?",
                    (row["id"],),
                )
        return [row["id"] for row in rows]

    # --- reads --------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        if not ID_PATTERN.match(job_id or ""):
            return None
        with self._guard():
            rows = self._backend.rows(f"SELECT *, {self._backend.now} AS now FROM jobs WHERE id = ?", (job_id,))
        return self._public(rows[0]) if rows else None

    def list(self, limit: int = 100, after: str | None = None) -> list[dict]:
        """The latest jobs, newest first; ``after``: the last id of the previous page (its older jobs follow)."""
        db = self._backend
        with self._guard():
            if after is None:
                rows = db.rows(f"SELECT *, {db.now} AS now FROM jobs ORDER BY seq DESC LIMIT ?", (int(limit),))
            else:
                rows = db.rows(
                    f"SELECT *, {db.now} AS now FROM jobs WHERE seq < (SELECT seq FROM jobs WHERE id = ?)"
                    " ORDER BY seq DESC LIMIT ?",
                    (after, int(limit)),
                )
        return [self._public(row) for row in rows]

    def page(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """Up to ``limit`` jobs in the order they were accepted (``desc``: newest first), after the job ``after`` (the
        last id of the previous page). Returns ``(jobs, has_more)``; an ``after`` that is not a job gives an empty
        page."""
        db, newest = self._backend, order != "asc"
        where, args = "", ()
        with self._guard():
            if after is not None:
                found = db.rows("SELECT seq FROM jobs WHERE id = ?", (after,))
                if not found:
                    return [], False
                where, args = ("WHERE seq < ?" if newest else "WHERE seq > ?"), (found[0]["seq"],)
            rows = db.rows(
                f"SELECT *, {db.now} AS now FROM jobs {where} ORDER BY seq {'DESC' if newest else 'ASC'} LIMIT ?",
                (*args, int(limit) + 1),
            )
        return [self._public(row) for row in rows[:limit]], len(rows) > limit

    def count_active(self) -> int:
        with self._guard():
            return self._count_active()

    def position(self, job_id: str) -> int | None:
        """Jobs ahead of a queued job (0: next)."""
        with self._guard():
            rows = self._backend.rows("SELECT seq, status FROM jobs WHERE id = ?", (job_id,))
            if not rows or rows[0]["status"] != "queued":
                return None
            ahead = self._backend.rows(
                "SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'in_progress') AND seq < ?",
                (rows[0]["seq"],),
            )
        return int(ahead[0]["n"])

    # --- internals ----------------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self):
        """The connection lock, with every database fault turned into one ``StoreError`` line (and a lost
        PostgreSQL connection opened again at the next call)."""
        with self._lock:
            try:
                if self._backend.db is None:
                    self._backend.connect()
                yield
            except StoreError:
                raise
            except self._backend.errors as err:
                db = self._backend.db
                if self._backend.name == "postgresql" and db is not None and (db.closed or db.broken):
                    self._backend.close()
                raise StoreError(f"job store {redact(self.url)}: {_one_line(err)}") from None
            except OSError as err:
                raise StoreError(f"job store {redact(self.url)}: {err.strerror or err}") from None

    def _verdict(self, job_id: str, token: str) -> str:
        rows = self._backend.rows(
            "SELECT cancel_requested FROM jobs WHERE id = ? AND lease_token = ?", (job_id, token)
        )
        if not rows:
            return LOST
        return CANCEL if rows[0]["cancel_requested"] else HOLDS

    def _count_active(self) -> int:
        rows = self._backend.rows("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'in_progress')")
        return int(rows[0]["n"])

    def _public(self, row: dict) -> dict:
        job = {key: value for key, value in row.items() if key not in (*_PRIVATE, "now")}
        job["report"] = json.loads(row["report"]) if row.get("report") else None
        job["params"] = json.loads(row.get("params") or "{}")
        job["cancel_requested"] = bool(row.get("cancel_requested"))
        eta_at, now = row.get("eta_at"), row.get("now")
        job["eta_seconds"] = (
            round(max(0.0, eta_at - now), 1)
            if eta_at is not None and now is not None and job["status"] == "in_progress"
            else None
        )
        return job


def report_summary(report: dict) -> dict:
    """What a client sees of the run report (the full report lies beside the video)."""
    denoise = report.get("denoise") or {}
    return {
        "num_frames": report.get("num_frames"),
        "duration_seconds": report.get("duration_seconds"),
        "resolution": report.get("resolution"),
        "strategy": report.get("strategy"),
        "face_found": report.get("face_found"),
        "seconds_total": report.get("seconds_total"),
        "resumed_from_step": denoise.get("resumed_from_step"),
        "plan": report.get("plan"),
    }


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _checked(job_id: str) -> str:
    if not ID_PATTERN.match(job_id or ""):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id
