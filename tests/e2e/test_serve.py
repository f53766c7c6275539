"""``launch.serve`` on 2 gloo ranks (torchrun) with the tiny model, driven over HTTP by a real client.

One server launch (and one restart with the same command) carries every check: the API key (401 without it), bad
uploads (4xx with the command line's messages), three jobs posted at once and polled to ``completed`` (the
reference seed's video equal to the command line's), SIGTERM with one job running and one queued, then the restart:
both succeed, the running one resumed from its checkpoint with the uninterrupted video, and finished videos are
still served. The rest of the API (cancel, events, segments, the web page in Chromium) is in ``test_serve_api.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS, ROOT, env

pytestmark = pytest.mark.slow

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class Server:
    """``torchrun --nproc_per_node=2 -m launch.serve ...`` as a subprocess; ``url`` from its ``server.json``."""

    def __init__(self, args: list[str], state_dir: Path, log: Path, extra_env: dict | None = None) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "launch.serve",
            *args,
        ]
        self.state_dir, self.log, self.extra_env = state_dir, log, extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 240) -> Server:
        info = self.state_dir / "server.json"
        info.unlink(missing_ok=True)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=env() | self.extra_env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        import httpx

        while True:
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}): {self.tail()}"
            assert time.monotonic() < deadline, f"the server did not become ready: {self.tail()}"
            if info.is_file():
                self.url = json.loads(info.read_text())["url"]
                try:
                    if httpx.get(f"{self.url}/healthz", timeout=5).json()["ready"]:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)

    def stop(self, signum=signal.SIGTERM, timeout: float = 120) -> int:
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        # torchrun starts every rank in a session of its own: kill the ranks by parent pid, then torchrun
        for pid in [*_children(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(30)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    args = [
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        "sampling.steps=3",
        "serve.port=0",
        f"serve.data_dir={folder / 'state'}",
        f"serve.api_key={KEY}",
    ]
    srv = Server(args, folder / "state", folder / "server.log")
    (folder / "state").mkdir()
    srv.start()
    yield srv
    srv.kill()


def _post(url: str, image: Path, audio: Path, **fields):
    import httpx

    with open(image, "rb") as img, open(audio, "rb") as aud:
        files = {"image": (image.name, img), "audio": (audio.name, aud)}
        data = {k: str(v) for k, v in fields.items()}
        return httpx.post(f"{url}/v1/videos", files=files, data=data, headers=AUTH, timeout=60)


def _status(url: str, job_id: str) -> dict:
    import httpx

    response = httpx.get(f"{url}/v1/videos/{job_id}", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _wait(srv: Server, job_ids, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    pending, done = set(job_ids), {}
    while pending:
        assert srv.proc.poll() is None, f"the server exited: {srv.tail()}"
        assert time.monotonic() < deadline, f"jobs not finished: {pending}: {srv.tail()}"
        for job_id in sorted(pending):
            job = _status(srv.url, job_id)
            assert job["status"] in ("queued", "in_progress", "completed"), job
            if job["status"] == "completed":
                done[job_id] = job
                pending.discard(job_id)
        time.sleep(0.3)
    return done


def _video(url: str, job_id: str, into: Path) -> Path:
    import httpx

    response = httpx.get(f"{url}/v1/videos/{job_id}/content", headers=AUTH, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4", response.text
    into.write_bytes(response.content)
    return into


@pytest.mark.timeout(600)
def test_jobs_over_http_sigterm_and_restart(server, cli_reference, one_second_clip, tmp_path):
    import httpx

    from tests.utils.video import read_frames

    url, portrait = server.url, EXAMPLES / "portrait.jpg"
    assert httpx.get(f"{url}/healthz").json()["ready"] is True
    # who may call it: 401 without the key or with a wrong one
    assert httpx.get(f"{url}/v1/videos").status_code == 401
    assert httpx.get(f"{url}/v1/videos", headers={"Authorization": "Bearer nope"}).status_code == 401
    # bad uploads: the command line's one-line messages, naming the client's file, never a server path
    text = tmp_path / "notes.txt"
    text.write_text("this is not a portrait\n")
    bad = _post(url, text, one_second_clip)
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"].startswith("image=notes.txt: not a readable image"), bad.text
    assert str(server.state_dir) not in bad.text
    assert _post(url, portrait, text).json()["error"].startswith("audio=notes.txt: not a readable audio file")
    assert _post(url, portrait, one_second_clip, steps=0).status_code == 400

    # three jobs at once
    seeds = [(REFERENCE_SEED, REFERENCE_STEPS), (6, 3), (7, 3)]
    with ThreadPoolExecutor(3) as pool:
        posted = list(pool.map(lambda s: _post(url, portrait, one_second_clip, seed=s[0], steps=s[1]), seeds))
    assert [r.status_code for r in posted] == [202, 202, 202], [r.text for r in posted]
    ids = [r.json()["id"] for r in posted]
    done = _wait(server, ids)
    assert all(done[i]["step"] == done[i]["total_steps"] and done[i]["progress"] == 100 for i in ids)
    videos = [read_frames(_video(url, i, tmp_path / f"{i}.mp4")) for i in ids]
    reference = read_frames(cli_reference)
    np.testing.assert_array_equal(videos[0], reference)
    assert videos[1].shape == videos[2].shape == reference.shape and not np.array_equal(videos[1], videos[2])
    assert httpx.get(f"{url}/v1/videos/vid_{'0' * 24}", headers=AUTH).status_code == 404

    # SIGTERM with one job running (the reference job again) and one queued
    running = _post(url, portrait, one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS).json()["id"]
    queued = _post(url, portrait, one_second_clip, seed=8, steps=3).json()["id"]
    deadline = time.monotonic() + 120
    while True:  # one status read per poll, and the signal right after the read that shows a step done
        seen = _status(url, running)
        if seen["status"] != "queued" and (seen["step"] or 0) >= 1:
            break
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.01)
    server.stop(signal.SIGTERM)
    assert seen["status"] == "in_progress" and seen["step"] < REFERENCE_STEPS, ("job ended first", seen)
    assert "checkpointed after step" in server.tail(20000), server.tail()

    server.start()  # the same command
    url = server.url
    after = _wait(server, [running, queued])
    resumed = after[running]["resumed_from_step"]
    assert resumed is not None and 1 <= resumed < REFERENCE_STEPS, after[running]
    assert after[queued]["resumed_from_step"] is None
    np.testing.assert_array_equal(read_frames(_video(url, running, tmp_path / "resumed.mp4")), reference)
    # a video finished before the restart is still served, byte for byte
    again = _video(url, ids[1], tmp_path / "again.mp4").read_bytes()
    assert again == (tmp_path / f"{ids[1]}.mp4").read_bytes()
    assert not any((server.state_dir / "resume").iterdir())


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian packages chromium and chromium-driver)"
    return None
