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

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """``signum`` to the whole tree (ranks first, then the launcher); waits for the launcher to end."""
        if self.proc is None:
            return
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
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
