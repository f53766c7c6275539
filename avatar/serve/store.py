"""The server's durable job store: one SQLite file (stdlib ``sqlite3``) plus the uploads and results beside it.

Layout under ``serve.state_dir``::

    jobs.sqlite3              one row per job: status, settings, progress, error, report summary
    uploads/<id>/image        the uploaded portrait (the client's file name is kept only as text in the row)
    uploads/<id>/audio        the uploaded speech
    results/<id>.mp4          the finished video (and <id>.mp4.json, its run report)
    resume/<id>/              the renderer's resume state of an unfinished job (step checkpoints)

A job goes ``queued → running → succeeded | failed | cancelled``; a preempted job goes back to ``queued`` and keeps its place
(jobs run in the order they were accepted), so a restarted server continues it first, from its checkpoint. A job
left ``running`` by a crash is queued again when the store is opened. Every write is one committed transaction
(WAL journal, ``synchronous=FULL``); the store is used by rank 0 only, from the HTTP threads and the worker loop.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
from pathlib import Path

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")

#: Job ids the store hands out: ``vid_`` and 24 hex digits. Anything else is not a job (and never a path).
ID_PATTERN = re.compile(r"^vid_[0-9a-f]{24}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    image_name TEXT NOT NULL,
    audio_name TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    checkpoint_step INTEGER,
    resumed_from_step INTEGER,
    error TEXT,
    report TEXT
)
"""

#: Columns the HTTP API added to the first schema (issue 21): ``ALTER TABLE ... ADD COLUMN`` on an older store, so a
#: store made before them opens unchanged. ``cancel_requested``: ``DELETE`` of a running job (its worker stops at the
#: next step); ``percent`` / ``eta``: progress the worker computes (0-100, seconds left), readable by any front end;
#: ``segments``: how many segments a ``segments``-strategy job renders (NULL for the other strategies).
_API_COLUMNS = {
    "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
    "percent": "INTEGER NOT NULL DEFAULT 0",
    "eta": "REAL",
    "segments": "INTEGER",
}


def new_id() -> str:
    return "vid_" + secrets.token_hex(12)


class JobStore:
    """Jobs in ``<state_dir>/jobs.sqlite3``; thread-safe (one connection behind a lock)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir)
        for sub in ("uploads", "results", "resume"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._add_api_columns()
        self._pace: dict[str, tuple[float, int]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

    # --- writes -------------------------------------------------------------------------------------------------

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
    ) -> bool:
        """Queue a job whose files are already in ``upload_dir(job_id)``. With ``max_active``, refuse (return
        False) when that many jobs are already queued or running."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if max_active is not None and self._count_active() >= max_active:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "INSERT INTO jobs (id, status, created, prompt, seed, steps, image_name, audio_name, total)"
                    " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, time.time(), prompt, seed, steps, image_name, audio_name, steps),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return True

    def claim_next(self) -> dict | None:
        """The oldest queued job, now ``running`` (None when the queue is empty)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1 WHERE id = ?",
                        (time.time(), row["id"]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        if row is None:
            return None
        self._pace.pop(row["id"], None)
        return self._public(row) | {"status": "running", "attempts": row["attempts"] + 1}

    def progress(self, job_id: str, step: int, total: int) -> None:
        """Denoising step ``step`` of ``total`` is done (called by the worker after every step)."""
        now = time.time()
        if job_id not in self._pace:
            self._pace[job_id] = (now, step)
        self._exec("UPDATE jobs SET step = ?, total = ? WHERE id = ?", (step, total, job_id))

    def requeue(self, job_id: str, checkpoint_step: int | None) -> None:
        """A preempted job: back to ``queued`` in its place, to resume from ``checkpoint_step``."""
        self._pace.pop(job_id, None)
        self._exec(
            "UPDATE jobs SET status = 'queued', checkpoint_step = ? WHERE id = ? AND status = 'running'",
            (checkpoint_step, job_id),
        )

    def recover(self) -> list[str]:
        """At start-up: jobs left ``running`` by a crash are queued again. Returns their ids."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'running' ORDER BY seq")]
            self._db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'")
        return ids

    def succeed(self, job_id: str, report: dict) -> None:
        self._pace.pop(job_id, None)
        resumed = (report.get("denoise") or {}).get("resumed_from_step")
        self._exec(
            "UPDATE jobs SET status = 'succeeded', finished = ?, step = total, resumed_from_step = ?, report = ?"
            " WHERE id = ?",
            (time.time(), resumed, json.dumps(report_summary(report)), job_id),
        )

    def fail(self, job_id: str, error: str) -> None:
        self._pace.pop(job_id, None)
        self._exec(
            "UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE id = ?",
            (time.time(), " ".join(str(error).split())[:2000], job_id),
        )

    # --- reads --------------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        if not ID_PATTERN.match(job_id or ""):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._public(row)

    def list(self, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [self._public(row) for row in rows]

    def count_active(self) -> int:
        with self._lock:
            return self._count_active()

    def position(self, job_id: str) -> int | None:
        """Jobs ahead of a queued job (0: next)."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            ahead = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND seq < ?", (row["seq"],)
            ).fetchone()[0]
        return int(ahead)

    # --- internals ----------------------------------------------------------------------------------------------

    def _count_active(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')").fetchone()[0])

    def _exec(self, sql: str, args: tuple) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _public(self, row: sqlite3.Row) -> dict:
        job = {key: row[key] for key in row.keys() if key not in ("seq", "report")}
        job["report"] = json.loads(row["report"]) if row["report"] else None
        job["eta_seconds"] = self._eta(job)
        return job

    def _eta(self, job: dict) -> float | None:
        """Seconds left in the denoising, from the pace since the first step this process saw."""
        pace = self._pace.get(job["id"])
        if job["status"] != "running" or pace is None:
            return None
        start, first = pace
        done = job["step"] - first
        if done <= 0:
            return None
        return round((time.time() - start) / done * max(0, job["total"] - job["step"]), 1)

    # --- the HTTP API's additions (issue 21): paging, cancel, progress, files ---------------------------------------

    def _rollback(self) -> None:
        """After a failed statement: roll back what is still open (a failed COMMIT, e.g. a full disk, has already
        rolled back, and a second ROLLBACK would hide its error)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _add_api_columns(self) -> None:
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _API_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")

    def page(self, limit: int = 20, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """Up to ``limit`` jobs in acceptance order (``desc``: newest first), after the job ``after`` (the last id
        of the previous page). Returns ``(jobs, has_more)``; an ``after`` that is not a job gives an empty page."""
        newest = order != "asc"
        with self._lock:
            where, args = "", []
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    return [], False
                where, args = ("WHERE seq < ?" if newest else "WHERE seq > ?"), [row["seq"]]
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY seq {'DESC' if newest else 'ASC'} LIMIT ?", (*args, limit + 1)
            ).fetchall()
        return [self._public(row) for row in rows[:limit]], len(rows) > limit

    def request_cancel(self, job_id: str) -> str | None:
        """``DELETE`` of a job: a queued one becomes ``cancelled`` at once; a running one is flagged (its worker
        stops at the next step and calls ``mark_cancelled``). Returns the status after, None for no such job."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is not None and row["status"] == "queued":
                    self._db.execute(
                        "UPDATE jobs SET status = 'cancelled', finished = ?, cancel_requested = 1 WHERE id = ?",
                        (time.time(), job_id),
                    )
                elif row is not None and row["status"] == "running":
                    self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        if row is None:
            return None
        return "cancelled" if row["status"] == "queued" else row["status"]

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a ``DELETE`` asked to stop this job (the worker asks after every step)."""
        with self._lock:
            row = self._db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row["cancel_requested"])

    def mark_cancelled(self, job_id: str, step: int | None) -> None:
        """A running job its worker stopped on request, after ``step``."""
        self._pace.pop(job_id, None)
        self._exec(
            "UPDATE jobs SET status = 'cancelled', finished = ?, step = COALESCE(?, step), eta = NULL"
            " WHERE id = ? AND status = 'running'",
            (time.time(), step, job_id),
        )

    def set_progress(self, job_id: str, percent: int, eta: float | None) -> None:
        """The worker's estimate of the whole job: ``percent`` done (0-100) and ``eta`` seconds left."""
        self._exec("UPDATE jobs SET percent = ?, eta = ? WHERE id = ?", (int(percent), eta, job_id))

    def set_segments(self, job_id: str, count: int | None) -> None:
        """How many segments the job renders (``segments`` strategy), recorded when it is accepted."""
        self._exec("UPDATE jobs SET segments = ? WHERE id = ?", (count, job_id))

    def delete(self, job_id: str) -> bool:
        """Forget a finished (succeeded, failed or cancelled) job; its files are ``free_files``'s. Returns whether a
        row went."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM jobs WHERE id = ? AND status IN ('succeeded', 'failed', 'cancelled')", (job_id,)
            )
        return cursor.rowcount > 0

    def segments_dir(self, job_id: str) -> Path:
        """Where the ``segments`` strategy writes a job's finished segments (``manifest.json`` lists them)."""
        return self.result_path(job_id).with_name(self.result_path(job_id).name + ".segments")

    def report_path(self, job_id: str) -> Path:
        """The full run report beside the video."""
        return self.result_path(job_id).with_name(self.result_path(job_id).name + ".json")

    def free_files(self, job_id: str) -> None:
        """Remove everything stored for a job: upload, resume state, video, report, segments, temporaries."""
        import shutil

        result = self.result_path(job_id)
        for folder in (self.upload_dir(job_id), self.resume_dir(job_id), self.segments_dir(job_id)):
            shutil.rmtree(folder, ignore_errors=True)
        for path in [*result.parent.glob(f"{job_id}.mp4*"), *result.parent.glob(f".{job_id}.mp4*")]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


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


def _checked(job_id: str) -> str:
    if not ID_PATTERN.match(job_id or ""):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id
