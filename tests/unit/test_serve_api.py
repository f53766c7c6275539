"""The video API in-process over a real ``JobStore`` (no model): every posted field through the one validation
(seed -1 and 2**64 refused, steps capped by ``serve.max_steps``, nothing left on disk), paging, ``DELETE`` of queued,
running and finished jobs, the event stream and report of finished jobs, upload leftovers removed at start-up, the
API key from ``serve.api_key_file`` / ``AVATAR_API_KEY`` (any UTF-8 key), and storage faults (full, read-only, a
corrupt store) as one log line and a 503 with a JSON error. The faults are real: small tmpfs mounts filled up or
remounted read-only (skipped, with the reason, where this process may not mount)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES

KEY = {"Authorization": "Bearer k"}
PORTRAIT = (EXAMPLES / "portrait.jpg").read_bytes()


def _speech(seconds: float = 1.0) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(16000 * seconds), np.float32), 16000, format="WAV")
    return out.getvalue()


def _files(image: bytes = PORTRAIT, audio: bytes | None = None):
    return {"image": ("face.jpg", io.BytesIO(image)), "audio": ("talk.wav", io.BytesIO(audio or _speech()))}


def _config(**serve):
    from avatar.compose import compose

    cfg = compose(["model=tiny"])
    return replace(cfg, serve=replace(cfg.serve, api_key="k", **serve))


class Client:
    """A TestClient over ``create_app`` and a real store; ``leftovers()``: files under uploads/."""

    def __init__(self, state: Path, **serve) -> None:
        from fastapi.testclient import TestClient

        from avatar.serve.app import create_app
        from avatar.serve.store import JobStore

        self.store = JobStore(state)
        self.http = TestClient(create_app(_config(**serve), self.store))

    def post(self, **fields):
        return self.http.post("/v1/videos", files=_files(), data={k: str(v) for k, v in fields.items()}, headers=KEY)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in (self.store.root / "uploads").iterdir())

    def close(self) -> None:
        self.http.close()
        self.store.close()


@pytest.fixture
def client(tmp_path):
    c = Client(tmp_path / "state", max_queue=8)
    yield c
    c.close()


def test_posted_fields_go_through_the_one_validation(client):
    from avatar.config import SEED_MAX

    cases = {
        "-1": "seed=-1 is invalid; give an integer from 0 to",
        str(2**64): f"seed={2**64} is invalid; give an integer from 0 to",
        str(SEED_MAX + 1): "is invalid; give an integer from 0 to",
        "1e3": "seed='1e3' is invalid; give an integer",
    }
    for seed, message in cases.items():
        refused = client.post(seed=seed)
        assert refused.status_code == 400, (seed, refused.text)
        assert message in refused.json()["error"], refused.text
    steps = client.post(steps=1000000)
    assert steps.status_code == 400 and "steps=1000000 is over" in steps.json()["error"]
    assert "serve.max_steps" in steps.json()["error"]
    assert client.post(steps=0).json()["error"].startswith("steps=0 is invalid; give an integer ≥ 1")
    assert "is not served here" in client.post(model="sora-2").json()["error"]
    assert client.leftovers() == [] and client.store.count_active() == 0  # nothing stored for a refused request

    ok = client.post(seed=SEED_MAX, steps=100, model="tiny")
    assert ok.status_code == 202, ok.text
    job = ok.json()
    assert (job["status"], job["seed"], job["steps"], job["model"], job["object"]) == (
        "queued",
        SEED_MAX,
        100,
        "tiny",
        "video",
    )
    assert client.leftovers() == [job["id"]]


def test_paging_delete_events_and_report(client):
    ids = [client.post(seed=i).json()["id"] for i in range(5)]
    page = client.http.get("/v1/videos?limit=2", headers=KEY).json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == ids[:2:-1][:2] and page["has_more"]
    seen = [j["id"] for j in page["data"]]
    while page["has_more"]:
        page = client.http.get(f"/v1/videos?limit=2&after={page['last_id']}", headers=KEY).json()
        seen += [j["id"] for j in page["data"]]
    assert seen == ids[::-1]
    oldest = client.http.get("/v1/videos?limit=3&order=asc", headers=KEY).json()
    assert [j["id"] for j in oldest["data"]] == ids[:3] and oldest["has_more"]
    for bad in ("limit=0", "limit=101", "limit=x", "order=up", "after=vid_" + "0" * 24):
        assert client.http.get(f"/v1/videos?{bad}", headers=KEY).status_code == 400, bad

    # running: flagged, 202, the worker stops it after its next step
    running = client.store.claim_next()["id"]
    assert running == ids[0]
    flagged = client.http.delete(f"/v1/videos/{running}", headers=KEY)
    assert flagged.status_code == 202 and flagged.json()["status"] == "in_progress"
    assert flagged.json()["cancel_requested"] and client.store.cancel_requested(running)
    # queued: cancelled at once, its upload removed
    queued = ids[1]
    gone = client.http.delete(f"/v1/videos/{queued}", headers=KEY)
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled", gone.text
    assert queued not in client.leftovers()
    assert client.http.get(f"/v1/videos/{queued}/content", headers=KEY).status_code == 409
    events = client.http.get(f"/v1/videos/{queued}/events", headers=KEY)
    assert events.headers["content-type"].startswith("text/event-stream")
    kinds = [line.split(": ", 1)[1] for line in events.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["progress", "done"] and '"status":"cancelled"' in events.text
    # finished: forgotten with its files
    deleted = client.http.delete(f"/v1/videos/{queued}", headers=KEY).json()
    assert deleted == {"id": queued, "object": "video.deleted", "deleted": True}
    assert client.http.get(f"/v1/videos/{queued}", headers=KEY).status_code == 404

    # a completed job: content, report, 100 %, and no segments (not a segments job)
    done = ids[2]
    lease = client.store.claim_next()
    assert lease["id"] == done
    client.store.claim_next()
    client.store.result_path(done).write_bytes(b"mp4")
    client.store.report_path(done).write_text(json.dumps({"num_frames": 25}))
    assert client.store.succeed(done, {"num_frames": 25}, token=lease["lease_token"])
    view = client.http.get(f"/v1/videos/{done}", headers=KEY).json()
    assert view["status"] == "completed" and view["progress"] == 100 and view["urls"]["report"].endswith("/report")
    assert client.http.get(view["urls"]["report"], headers=KEY).json() == {"num_frames": 25}
    assert client.http.get(f"/v1/videos/{done}/segments/0", headers=KEY).status_code == 404
    assert client.http.delete(f"/v1/videos/{done}", headers=KEY).json()["deleted"]
    assert not client.store.result_path(done).exists() and not client.store.report_path(done).exists()


def test_uploads_a_killed_server_left_are_removed_at_start_up(tmp_path):
    from avatar.io.atomic import HOST
    from avatar.serve.store import JobStore, new_id

    uploads = tmp_path / "state" / "uploads"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "legacy": f".incoming-{new_id()}",  # the old name: always a leftover
            "dead": f".incoming-{HOST}-{int(dead.stdout)}-{new_id()}",
            "mine": f".incoming-{HOST}-{os.getpid()}-{new_id()}",  # a pid reused by the new server
            "live": f".incoming-{HOST}-{alive.pid}-{new_id()}",  # another server still uploading
            "elsewhere": f".incoming-ffffff-1-{new_id()}",  # another host, recent
            "old": f".incoming-eeeeee-1-{new_id()}",  # another host, an hour ago
        }
        for name in names.values():
            (uploads / name).mkdir(parents=True)
            (uploads / name / "image").write_bytes(b"x")
        os.utime(uploads / names["old"], (0, 0))
        JobStore(tmp_path / "state").close()
        Client(tmp_path / "state").close()
        left = sorted(p.name for p in uploads.iterdir())
        assert left == sorted([names["live"], names["elsewhere"]]), left
    finally:
        alive.kill()
        alive.wait(10)


def test_api_key_from_file_or_environment_any_utf8(tmp_path, tiny_weights, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    from avatar.compose import compose
    from avatar.serve.app import check_serve, create_app, with_api_key
    from avatar.serve.store import JobStore
    from launch.serve import main, prepare

    secret = "k=ey,with#hash ünï 🔑"
    args = ["model=tiny", f"weights={tiny_weights}", f"serve.data_dir={tmp_path / 's'}"]
    monkeypatch.setenv("AVATAR_API_KEY", secret)
    cfg, _ = prepare(args)
    assert cfg.serve.api_key == secret
    key_file = tmp_path / "key.txt"
    key_file.write_text("from the file=,#\n", encoding="utf-8")
    cfg, _ = prepare([*args, f"serve.api_key_file={key_file}"])
    assert cfg.serve.api_key == "from the file=,#"  # the file wins over the environment
    assert main([*args, f"serve.api_key_file={key_file}", "serve.api_key=x"]) == 2
    assert "serve.api_key and serve.api_key_file are both set" in capsys.readouterr().err
    key_file.write_bytes(b"\xff\xfe")
    assert main([*args, f"serve.api_key_file={key_file}"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    monkeypatch.delenv("AVATAR_API_KEY")
    assert main([*args, "serve.host=0.0.0.0"]) == 2  # no key from anywhere: refused as before
    for bad in (" padded", "tab\tin"):
        with pytest.raises(Exception, match="an HTTP header cannot carry it"):
            check_serve(with_api_key(replace(compose(args), serve=replace(compose(args).serve, api_key=bad)), None))

    cfg = with_api_key(compose(args), secret)
    store = JobStore(tmp_path / "s")
    with TestClient(create_app(cfg, store)) as http:
        right = {"Authorization": b"Bearer " + secret.encode("utf-8")}
        assert http.get("/v1/videos", headers=right).status_code == 200
        wrong = {"Authorization": b"Bearer " + secret[:-1].encode("utf-8")}
        assert http.get("/v1/videos", headers=wrong).status_code == 401
    store.close()


# --- storage faults -------------------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"cannot run mount: {err}"
    return None if done.returncode == 0 else f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"


def _fill(folder: Path) -> Path:
    """Write until the file system is full; returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def small_disks(tmp_path):
    """Two 8 MiB tmpfs: ``db`` holds the job store, ``data`` its uploads (a symlink from the store's folder)."""
    mounted = []
    for name in ("db", "data"):
        reason = _mount_tmpfs(tmp_path / name, "8m")
        if reason:
            for path in mounted:
                subprocess.run(["umount", "-l", str(path)], timeout=30)
            pytest.skip(reason)
        mounted.append(tmp_path / name)
    (tmp_path / "data" / "uploads").mkdir()
    (tmp_path / "db" / "state").mkdir()
    (tmp_path / "db" / "state" / "uploads").symlink_to(tmp_path / "data" / "uploads")
    yield tmp_path / "db", tmp_path / "data"
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], timeout=30)


def _faults(caplog) -> list[logging.LogRecord]:
    found = [r for r in caplog.records if r.name == "avatar.serve.app" and r.levelno >= logging.ERROR]
    caplog.clear()
    return found


def _is_503(response, words: str) -> None:
    assert response.status_code == 503, response.text
    assert words in response.json()["error"], response.text


def test_storage_faults_are_one_log_line_and_a_503(small_disks, caplog):
    db, data = small_disks
    client = Client(db / "state", max_queue=8)
    caplog.set_level(logging.INFO, logger="avatar.serve.app")
    try:
        first = client.post().json()["id"]
        caplog.clear()

        filler = _fill(data)  # the data folder is full: the upload cannot be stored
        _is_503(client.post(), "ENOSPC")
        filler.unlink()
        assert client.leftovers() == [first]

        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True, timeout=30)  # read-only
        _is_503(client.post(), "EROFS")
        subprocess.run(["mount", "-o", "remount,rw", str(data)], check=True, timeout=30)
        assert client.leftovers() == [first]

        filler = _fill(db)  # the job store's disk is full: the upload is stored, the row cannot be
        _is_503(client.post(), "database or disk is full")
        assert client.leftovers() == [first]  # the upload went with the failed request
        _is_503(client.http.delete(f"/v1/videos/{first}", headers=KEY), "database or disk is full")
        assert client.http.get(f"/v1/videos/{first}", headers=KEY).json()["status"] == "queued"  # reads go on
        records = _faults(caplog)
        assert len(records) == 4, [r.getMessage() for r in records]
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in records)
        filler.unlink()
        assert client.post().status_code == 202  # the storage is back: so is the server, without a restart
    finally:
        client.close()


def test_a_corrupt_store_stops_the_server_in_one_line(tmp_path, tiny_weights, capsys):
    from launch.serve import main

    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.sqlite3").write_bytes(b"this is not a database" * 200)
    assert main(["model=tiny", f"weights={tiny_weights}", f"serve.data_dir={state}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the job store cannot be used" in err and "file is not a database" in err, err


# --- several speakers: repeated speakers fields, one audio file each ---------------------------------------------

TWO_FACES = (EXAMPLES / "two_faces.jpg").read_bytes()
LEFT, RIGHT = [110, 64, 210, 164], [430, 64, 530, 164]  # the faces of two_faces.jpg (640x320)


def _voice(start: float, seconds: float) -> bytes:
    """A cut of the example speech (a speaker's track may not be all silence)."""
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    out = io.BytesIO()
    sf.write(out, wav[int(start * rate) : int((start + seconds) * rate)], rate, format="WAV")
    return out.getvalue()


def _post_speakers(client, speakers: list, tracks: list[bytes], image: bytes = TWO_FACES):
    files = [("image", ("faces.jpg", io.BytesIO(image)))]
    files += [("audio", (f"voice{i + 1}.wav", io.BytesIO(track))) for i, track in enumerate(tracks)]
    data = {"speakers": [s if isinstance(s, str) else json.dumps(s) for s in speakers]}
    return client.http.post("/v1/videos", files=files, data=data, headers=KEY)


def test_speakers_fields_store_a_job_every_worker_reads_back(client):
    """Two speakers fields and two audio files: stored as image, audio, audio_2 and speakers.json; the worker's
    ``stored_job`` reads back the two tracks in order with their boxes; turns take one shared recording."""
    from avatar.pipeline.state import file_sha256
    from avatar.serve.upload import stored_job

    one, two = _voice(0.0, 1.0), _voice(2.0, 0.6)
    ok = _post_speakers(client, [{"face": LEFT, "name": "Ann"}, {"face": RIGHT, "name": "Bob"}], [one, two])
    assert ok.status_code == 202, ok.text
    view = ok.json()
    assert view["audio"] == "voice1.wav, voice2.wav"
    folder = client.store.upload_dir(view["id"])
    assert sorted(p.name for p in folder.iterdir()) == ["audio", "audio_2", "image", "speakers.json"]
    job = stored_job(_config(), folder, "out.mp4", view["id"])
    assert [s.name for s in job.speakers.speakers] == ["Ann", "Bob"] and job.audio == ""
    assert [s.face for s in job.speakers.speakers] == [tuple(map(float, LEFT)), tuple(map(float, RIGHT))]
    assert [file_sha256(s.audio) for s in job.speakers.speakers] == [
        file_sha256(folder / "audio"),
        file_sha256(folder / "audio_2"),
    ]
    assert (folder / "audio_2").read_bytes() == two

    turns = [{"face": LEFT, "turns": [[0, 0.5]]}, {"face": RIGHT, "turns": [[0.5, 1.0]]}]
    shared = _post_speakers(client, [json.dumps(turns)], [one])  # one field holding the list works too
    assert shared.status_code == 202, shared.text
    job = stored_job(_config(), client.store.upload_dir(shared.json()["id"]), "out.mp4", shared.json()["id"])
    assert job.speakers.turns and job.audio == job.speakers.shared_audio
    assert [s.turns for s in job.speakers.speakers] == [((0.0, 0.5),), ((0.5, 1.0),)]


def test_bad_speakers_fields_are_one_line_naming_the_speaker(client):
    one, two = _voice(0.0, 1.0), _voice(2.0, 0.6)
    ann, bob = {"face": LEFT, "name": "Ann"}, {"face": RIGHT, "name": "Bob"}
    cases = [
        ([ann, bob], [one], "2 speakers and 1 audio files; send one audio file per speaker"),
        ([], [one, two], "2 audio files without speakers; send one speakers field per audio file"),
        ([ann, {**bob, "audio": "/etc/passwd"}], [one, two], "speaker 2 audio: a server does not read paths"),
        ([ann, "{nope"], [one, two], "speakers field 2 is not valid JSON"),
        ([ann, {**bob, "mouth": 1}], [one, two], "speaker 2 mouth: unknown field; valid fields are face, name, turns"),
        ([ann, {**bob, "face": [600, 64, 700, 164]}], [one, two], 'speakers: speaker 2 ("Bob") face'),
        ([ann, {**bob, "face": LEFT}], [one, two], 'speaker 2 ("Bob")'),
        ([ann, bob], [one, b""], 'speaker 2 ("Bob") audio: audio=voice2.wav: the file is empty'),
        ([{**ann, "turns": [[0, 1]]}, {**bob, "turns": [[1, 2]]}], [one, two], "send one audio file, not 2"),
        ([{"face": "auto"}] * 9, [one], "9 speakers; at most 8"),
        ([{"face": "auto"}] * 9, [one] * 9, "at most 8 audio files and 8 speakers fields"),
    ]
    for speakers, tracks, expect in cases:
        refused = _post_speakers(client, speakers, tracks)
        assert refused.status_code == 400, (expect, refused.text)
        error = refused.json()["error"]
        assert expect in error and "\n" not in error, (expect, error)
        assert str(client.store.root) not in error, error  # the stored paths never show
    assert client.leftovers() == [] and client.store.count_active() == 0
