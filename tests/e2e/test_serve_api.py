"""The video API against a real ``launch.serve`` (2 gloo ranks, tiny model), as its clients use it.

One server, its API key from ``AVATAR_API_KEY`` (with ``=``, ``,`` and ``#`` in it, which the command line cannot
take): an OpenAI-style client in plain HTTP (``urllib``: POST, poll for ``completed``, GET ``/content``);
``DELETE`` of a running job stops it within one step on both ranks and removes its files, and the server goes on;
a 40 s job (the ``segments`` strategy, 2 steps) whose event stream delivers every segment, each one playable while
the rest renders, before the job completes. Where Chromium is installed, that job is submitted through the web page,
which is seen playing segment 1 while later ones render (a screenshot: ``docs/serve.png`` with
``AVATAR_SERVE_SCREENSHOT=docs/serve.png``)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS
from tests.e2e.test_serve import CHROMEDRIVER, CHROMIUM, Server, _browser_missing

pytestmark = pytest.mark.slow

KEY = "k=ey,with#hash"  # AVATAR_API_KEY: never on the command line
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_SECONDS = 40.0
#: Windows of 129 frames (5 s segments, as the official model's window) keep a 40 s job to 10 segments.
WINDOW = 129
OBSERVED: dict = {}  # what the page showed during the long job (filled by _watch_page)


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-api")
    state = folder / "state"
    state.mkdir()
    args = [
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        f"model.window_frames={WINDOW}",
        "sampling.steps=3",
        "serve.port=0",
        f"serve.data_dir={state}",
    ]
    assert not any(KEY in a for a in args)
    srv = Server(args, state, folder / "server.log", extra_env={"AVATAR_API_KEY": KEY})
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def long_audio(tmp_path_factory) -> Path:
    """40 s of real speech: the 16 s example looped and cut."""
    wav, rate = sf.read(str(EXAMPLES / "speech_16s.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("long") / "speech_40s.wav"
    sf.write(str(path), np.tile(wav, 3)[: int(LONG_SECONDS * rate)], rate)
    return path


# --- a client in plain HTTP -----------------------------------------------------------------------------------------


def call(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """``(status, headers, body bytes)`` of one request (urllib only, as a tool with no SDK would do it)."""
    request = urllib.request.Request(url, data=body, method=method, headers={**AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def multipart_parts(parts: list[tuple[str, Path | str]]) -> tuple[bytes, str]:
    """A multipart body of ``(name, file path or text)`` parts in order; a name may repeat."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in parts:
        if isinstance(value, Path):
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{value.name}"\r\n'
            chunks.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + value.read_bytes())
        else:
            chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def multipart(files: dict[str, Path], fields: dict[str, str]) -> tuple[bytes, str]:
    return multipart_parts([*fields.items(), *files.items()])


def post_video(url: str, audio: Path, **fields) -> dict:
    body, kind = multipart(
        {"image": EXAMPLES / "portrait.jpg", "audio": audio}, {k: str(v) for k, v in fields.items()}
    )
    status, _, data = call("POST", f"{url}/v1/videos", body, {"Content-Type": kind})
    assert status == 202, data
    return json.loads(data)


def get_video(url: str, job_id: str) -> dict:
    status, _, data = call("GET", f"{url}/v1/videos/{job_id}")
    assert status == 200, data
    return json.loads(data)


def poll(srv: Server, job_id: str, until: tuple[str, ...], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get_video(srv.url, job_id)
        assert job["status"] in ("queued", "in_progress", "completed", "failed", "cancelled"), job
        if job["status"] in until:
            return job
        assert srv.proc.poll() is None, srv.tail()
        assert time.monotonic() < deadline, (job, srv.tail())
        time.sleep(0.2)


def job_files(srv: Server, job_id: str) -> list[str]:
    root = srv.state_dir
    found = [p for sub in ("uploads", "resume") for p in (root / sub).glob(f"*{job_id}*")]
    found += list((root / "results").glob(f"*{job_id}*"))
    return sorted(str(p.relative_to(root)) for p in found)


# --- the tests ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_openai_style_client_polls_for_completed(server, one_second_clip, tmp_path):
    from avatar.io.video import probe

    assert call("GET", f"{server.url}/v1/videos", headers={"Authorization": "Bearer k"})[0] == 401
    created = post_video(server.url, one_second_clip, prompt="A woman speaks.", seed=11, steps=3, model="tiny")
    assert (created["object"], created["progress"], created["model"]) == ("video", 0, "tiny"), created
    assert created["status"] in ("queued", "in_progress"), created  # an idle worker may take it at once
    seen = set()
    deadline = time.monotonic() + 240
    while True:  # the loop an aiperf-like tool runs: poll until a final status
        job = get_video(server.url, created["id"])
        seen.add(job["status"])
        assert 0 <= job["progress"] <= 100
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)
    assert job["status"] == "completed", job
    assert (
        job["progress"] == 100 and job["step"] == job["total_steps"] == 3 and job["completed_at"] >= job["created_at"]
    )
    status, headers, data = call("GET", f"{server.url}{job['urls']['content']}")
    assert status == 200 and headers["content-type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(data)
    assert probe(str(tmp_path / "out.mp4")).frames == 25
    status, _, report = call("GET", f"{server.url}/v1/videos/{job['id']}/report")
    assert status == 200 and json.loads(report)["seed"] == 11
    listed = json.loads(call("GET", f"{server.url}/v1/videos?limit=1")[2])
    assert listed["object"] == "list" and listed["data"][0]["id"] == job["id"]


@pytest.mark.timeout(400)
def test_two_speakers_posted_as_repeated_fields_render_as_the_cli_does(server, tiny_weights, tmp_path):
    """Two ``speakers`` fields and two ``audio`` files (one multipart part each, in order): the job completes on the
    server's two ranks with the CLI's frames for the same ``speakers=`` file, and its report has both boxes."""
    from tests.e2e.conftest import generate
    from tests.utils.video import read_frames

    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    left, right = tmp_path / "left.wav", tmp_path / "right.wav"
    sf.write(str(left), wav[:rate], rate)
    sf.write(str(right), wav[2 * rate : int(2.6 * rate)], rate)
    faces = [{"name": "Ann", "face": [110, 64, 210, 164]}, {"name": "Bob", "face": [430, 64, 530, 164]}]
    parts = [("image", EXAMPLES / "two_faces.jpg"), ("audio", left), ("audio", right)]
    parts += [("speakers", json.dumps(face)) for face in faces] + [("seed", "4"), ("steps", "2")]
    body, kind = multipart_parts(parts)
    status, _, data = call("POST", f"{server.url}/v1/videos", body, {"Content-Type": kind})
    assert status == 202, data
    job = poll(server, json.loads(data)["id"], ("completed", "failed"))
    assert job["status"] == "completed", job
    status, _, video = call("GET", f"{server.url}{job['urls']['content']}")
    assert status == 200
    (tmp_path / "served.mp4").write_bytes(video)
    report = json.loads(call("GET", f"{server.url}/v1/videos/{job['id']}/report")[2])
    assert [s["name"] for s in report["speakers"]] == ["Ann", "Bob"]
    assert [s["box"] for s in report["speakers"]] == [[110.0, 64.0, 210.0, 164.0], [430.0, 64.0, 530.0, 164.0]]

    spec = tmp_path / "speakers.json"
    spec.write_text(json.dumps([{**faces[0], "audio": str(left)}, {**faces[1], "audio": str(right)}]))
    result = generate(
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        f"model.window_frames={WINDOW}",
        f"image={EXAMPLES / 'two_faces.jpg'}",
        f"speakers={spec}",
        "seed=4",
        "sampling.steps=2",
        f"output={tmp_path / 'cli.mp4'}",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert np.array_equal(read_frames(tmp_path / "served.mp4"), read_frames(tmp_path / "cli.mp4"))


@pytest.mark.timeout(300)
def test_delete_stops_a_running_job_within_one_step(server, one_second_clip):
    steps = 100  # serve.max_steps: far more than it will run
    job_id = post_video(server.url, one_second_clip, seed=3, steps=steps)["id"]
    deadline = time.monotonic() + 120
    while (job := get_video(server.url, job_id))["step"] < 2:
        assert job["status"] in ("queued", "in_progress") and time.monotonic() < deadline, (job, server.tail())
        time.sleep(0.05)
    assert job["progress"] >= 1 and job["eta_seconds"] is not None, job
    status, _, data = call("DELETE", f"{server.url}/v1/videos/{job_id}")
    assert status == 202 and json.loads(data)["cancel_requested"], data
    at_delete = get_video(server.url, job_id)["step"]  # a step read after the flag was stored
    job = poll(server, job_id, ("cancelled", "completed", "failed"), timeout=60)
    assert job["status"] == "cancelled", job
    assert job["step"] <= at_delete + 1 < steps, (at_delete, job)
    assert job_files(server, job_id) == []  # upload, checkpoint, partial output: all gone
    assert call("GET", f"{server.url}/v1/videos/{job_id}/content")[0] == 409
    assert "cancel requested; stopping after this step" in server.tail(200000)
    # the server goes on: the next job renders
    after = post_video(server.url, one_second_clip, seed=4, steps=2)["id"]
    assert poll(server, after, ("completed", "failed"))["status"] == "completed"


def _events(url: str, job_id: str, into: list, errors: list) -> None:
    """Read the job's event stream to its end, appending ``(seconds, event, data)``; fetches each segment as it is
    announced (and records whether the job was still rendering then)."""
    import httpx

    start = time.monotonic()
    try:
        with httpx.stream("GET", f"{url}/v1/videos/{job_id}/events", headers=AUTH, timeout=300) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "segment":
                        got = httpx.get(f"{url}{data['url']}", headers=AUTH, timeout=60)
                        status = httpx.get(f"{url}/v1/videos/{job_id}", headers=AUTH, timeout=60).json()["status"]
                        data = data | {"bytes": got.content, "http": got.status_code, "job_status": status}
                    into.append((time.monotonic() - start, event, data))
    except Exception as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=980,760",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _submit_in_page(driver, url: str, audio: Path) -> str:
    from selenium.webdriver.common.by import By

    driver.set_page_load_timeout(60)
    driver.get(url + "/")
    driver.find_element(By.ID, "image").send_keys(str(EXAMPLES / "portrait.jpg"))
    driver.find_element(By.ID, "audio").send_keys(str(audio))
    driver.find_element(By.ID, "prompt").send_keys("A woman speaks to the camera.")
    driver.find_element(By.ID, "steps").send_keys("2")
    driver.find_element(By.ID, "key").send_keys(KEY)
    driver.find_element(By.ID, "submit").click()
    deadline = time.monotonic() + 60
    while not (job_id := driver.execute_script("return document.getElementById('video').dataset.job || ''")):
        error = driver.find_element(By.ID, "error").text
        assert not error and time.monotonic() < deadline, error or "the page did not post the job"
        time.sleep(0.1)
    return job_id


def _watch_page(driver, srv: Server, job_id: str, tmp_path: Path) -> None:
    """Until the job ends: note the moment the page plays segment 1 (its first, index 0) while the job still renders
    later ones; then wait for the whole video in the player."""
    from selenium.webdriver.common.by import By

    state_js = (
        "const v = document.getElementById('video');"
        "return [v.dataset.segment ?? null, v.currentTime, v.paused, v.readyState, v.videoWidth, v.duration];"
    )
    deadline, looked = time.monotonic() + 400, time.monotonic()
    while "playing" not in OBSERVED:
        segment, current, paused, ready, width, _ = driver.execute_script(state_js)
        assert not driver.find_element(By.ID, "error").text, driver.find_element(By.ID, "error").text
        if segment == "0" and current > 0 and not paused and ready >= 2 and width == 64:
            OBSERVED["playing"] = {"time": current, "job": get_video(srv.url, job_id)}
            shot = tmp_path / "serve.png"
            driver.save_screenshot(str(shot))
            OBSERVED["screenshot"] = shot.read_bytes()
            if os.environ.get("AVATAR_SERVE_SCREENSHOT"):  # how docs/serve.png is made
                shutil.copyfile(shot, os.environ["AVATAR_SERVE_SCREENSHOT"])
        elif time.monotonic() - looked > 1:  # the job ended without the page ever playing segment 1
            looked = time.monotonic()
            if get_video(srv.url, job_id)["status"] in ("completed", "failed", "cancelled"):
                break
        assert time.monotonic() < deadline, srv.tail()
        time.sleep(0.1)
    while time.monotonic() < deadline:  # then the whole video replaces the segments
        segment, _, _, ready, width, duration = driver.execute_script(state_js)
        if segment is None and ready >= 1 and width == 64 and abs(duration - LONG_SECONDS) < 0.2:
            OBSERVED["whole"] = {"duration": duration, "status": driver.find_element(By.ID, "status").text}
            return
        time.sleep(0.3)


@pytest.fixture(scope="module")
def long_run(server, long_audio, tmp_path_factory) -> dict:
    """The 40 s job, submitted through the web page where Chromium is installed (else over HTTP), its event stream
    read meanwhile: ``{"events": [(seconds, event, data)], "errors": [...], "page": {...}}``."""
    tmp_path = tmp_path_factory.mktemp("long-run")
    driver = None if _browser_missing() else _browser()
    events: list = []
    errors: list = []
    OBSERVED.clear()
    try:
        if driver is not None:
            job_id = _submit_in_page(driver, server.url, long_audio)
        else:
            job_id = post_video(server.url, long_audio, steps=2)["id"]
        reader = threading.Thread(target=_events, args=(server.url, job_id, events, errors), daemon=True)
        reader.start()
        if driver is not None:
            _watch_page(driver, server, job_id, tmp_path)
        reader.join(420)
        if reader.is_alive():
            errors.append(TimeoutError("the event stream did not end"))
    finally:
        if driver is not None:
            driver.quit()
    return {"events": events, "errors": errors, "page": dict(OBSERVED)}


@pytest.mark.timeout(600)
def test_events_deliver_every_segment_before_the_job_completes(server, long_run, tmp_path):
    from avatar.io.video import probe

    events, errors = long_run["events"], long_run["errors"]
    assert not errors, (errors, server.tail())

    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "done" and events[-1][2]["status"] == "completed", (kinds, server.tail())
    segments = [data for _, kind, data in events if kind == "segment"]
    total = events[-1][2]["segments"]["total"]
    assert total >= 8 and [s["index"] for s in segments] == list(range(total)), segments
    assert kinds.index("done") > max(i for i, kind in enumerate(kinds) if kind == "segment")
    # every segment was announced, and served, while the job was still rendering
    assert all(s["job_status"] == "in_progress" and s["http"] == 200 for s in segments), [
        (s["index"], s["job_status"], s["http"]) for s in segments
    ]
    frames = 0
    for s in segments:
        path = tmp_path / s["file"]
        path.write_bytes(s["bytes"])
        info = probe(str(path))
        assert info.frames == s["num_frames"] and info.audio_streams == 1, (s["index"], info)
        frames += info.frames
    assert frames == LONG_SECONDS * 25
    progress = [data["progress"] for _, kind, data in events if kind == "progress"]
    assert progress == sorted(progress) and progress[-1] == 100 and len(set(progress)) > 5, progress


@pytest.mark.timeout(600)
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_web_page_plays_segment_one_while_the_rest_renders(long_run):
    page = long_run["page"]
    playing = page.get("playing")
    assert playing, ("the page never played segment 1", long_run["errors"])
    job = playing["job"]
    assert job["status"] == "in_progress" and job["segments"]["done"] < job["segments"]["total"], job
    assert page["screenshot"][:8] == b"\x89PNG\r\n\x1a\n"
    assert page.get("whole"), "the page did not show the whole video once the job completed"
    assert page["whole"]["status"].startswith("Done"), page["whole"]
