"""Long-running entry points as subprocesses for the server tests: start with a log file, wait for a log line or an
HTTP answer (always with a deadline), kill the whole process tree (torchrun starts every rank in a session of its
own, so its ranks are found by parent pid)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.conftest import ROOT, env


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    for child in children(pid):
        out += tree(child)
    return out


class Service:
    """One entry point (``python -m MODULE`` or ``torchrun --nproc_per_node=N -m MODULE``) and its log."""

    def __init__(self, name: str, module: str, args: list[str], log: Path, nproc: int = 1) -> None:
        runner = [sys.executable]
        if nproc > 1:
            runner += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        self.name, self.log = name, log
        self.cmd = [*runner, "-m", module, *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Service:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} ---\n{self.text()[-chars:]}"

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> list[str]:
        """Wait until ``pattern`` (a regex) matched ``count`` lines of the log; the matches."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(pattern, self.text())
            if len(found) >= count:
                return found
            assert self.proc.poll() is None, f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}"
            assert time.monotonic() < deadline, f"{self.name}: no {pattern!r} within {timeout:.0f} s:\n{self.tail()}"
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return tree(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def send(self, signum: int) -> None:
        """``signum`` to the whole tree (ranks first, then the launcher)."""
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """``signum`` to the whole tree; waits for the launcher to end."""
        if self.proc is None:
            return
        self.send(signal.SIGCONT)  # a stopped process would not die of SIGTERM
        self.send(signum)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def wait_http(url: str, timeout: float, proc: Service | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None:
            assert proc.proc.poll() is None, f"{proc.name} exited:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"{url} did not answer within {timeout:.0f} s"
        time.sleep(0.3)


# --- the video API, as a plain HTTP client sees it -------------------------------------------------------------------


def post_job(url: str, image: Path, audio: Path, headers: dict | None = None, **fields) -> str:
    """``POST /v1/videos`` (multipart); the new job's id."""
    import httpx

    with open(image, "rb") as img, open(audio, "rb") as aud:
        files = {"image": (image.name, img), "audio": (audio.name, aud)}
        data = {k: str(v) for k, v in fields.items()}
        response = httpx.post(f"{url}/v1/videos", files=files, data=data, headers=headers or {}, timeout=60)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_status(url: str, job_id: str, headers: dict | None = None) -> dict:
    import httpx

    response = httpx.get(f"{url}/v1/videos/{job_id}", headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_completed(url: str, job_ids, timeout: float, services=(), headers: dict | None = None) -> dict:
    """Poll each job until ``completed`` (any other final status fails the test); ``{id: status}``."""
    deadline = time.monotonic() + timeout
    pending, done = set(job_ids), {}
    while pending:
        for service in services:
            assert service.proc.poll() is None, f"{service.name} exited:\n{service.tail()}"
        assert time.monotonic() < deadline, f"not completed: {sorted(pending)}\n" + "\n".join(
            s.tail(1500) for s in services
        )
        for job_id in sorted(pending):
            job = job_status(url, job_id, headers)
            assert job["status"] in ("queued", "in_progress", "completed"), job
            if job["status"] == "completed":
                done[job_id] = job
                pending.discard(job_id)
        time.sleep(0.3)
    return done


def download(url: str, job_id: str, into: Path, headers: dict | None = None) -> Path:
    import httpx

    response = httpx.get(f"{url}/v1/videos/{job_id}/content", headers=headers or {}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4", response.text
    into.write_bytes(response.content)
    return into


def completions(services) -> list[str]:
    """Every ``job <id>: completed`` line of the workers' logs: the ids, once per completion."""
    return [job for s in services for job in re.findall(r"job (vid_[0-9a-f]{24}): completed", s.text())]
