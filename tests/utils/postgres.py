"""A real PostgreSQL server for the tests: ``initdb`` into a fresh folder, ``pg_ctl start`` on a free port of
127.0.0.1 (and a unix socket in that folder), ``pg_ctl stop`` and the folder removed at the end.

The server binaries come from ``AVATAR_PG_BIN`` when set, else ``PATH``, else the newest
``/usr/lib/postgresql/*/bin`` (the Debian package ``postgresql``). PostgreSQL refuses to run as root: under root the
server runs as the ``postgres`` user (or ``nobody``) through ``runuser``. Every command has a timeout.
``PostgresServer.start()`` raises ``Unavailable`` with the reason when no server can be started (the fixture skips
with it)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.utils.spawn import free_port

TIMEOUT = 60


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason is the message)."""


def server_bin() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    if os.environ.get("AVATAR_PG_BIN"):
        return Path(os.environ["AVATAR_PG_BIN"])
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4] or 0))
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    def __init__(self) -> None:
        self.bin = server_bin()
        self.folder: Path | None = None
        self.port = 0
        self._user: str | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _run(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self._user is not None:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.folder)

    def start(self) -> PostgresServer:
        if self.bin is None or not (self.bin / "initdb").exists():
            raise Unavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl): install the Debian package postgresql "
                "or set AVATAR_PG_BIN"
            )
        self.folder = Path(tempfile.mkdtemp(prefix="avatar-pg-"))
        if os.geteuid() == 0:
            self._user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            if self._user is None or shutil.which("runuser") is None:
                raise Unavailable("running as root without a postgres/nobody user and runuser to start PostgreSQL")
            entry = pwd.getpwnam(self._user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
        init = self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
        )
        if init.returncode != 0:
            self.stop()
            raise Unavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        started = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w",
            "-t", str(TIMEOUT), "start", timeout=TIMEOUT + 10,
        )  # fmt: skip
        if started.returncode != 0:
            log = (self.folder / "log").read_text(errors="replace")[-800:] if (self.folder / "log").exists() else ""
            self.stop()
            raise Unavailable(f"pg_ctl start failed: {started.stderr.strip()[-300:]} {log}")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.folder is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
