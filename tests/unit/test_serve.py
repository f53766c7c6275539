"""The server's pieces without a model (the job store itself: ``test_store.py``): the HTTP app in-process over a real store (API key, upload limits, validation messages, queue limit, status and
content), and the settings checks of ``launch.serve`` (a non-loopback bind without a key refuses to start)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest

from tests.e2e.conftest import EXAMPLES


@pytest.fixture
def app_client(tmp_path):
    from fastapi.testclient import TestClient

    from avatar.compose import compose
    from avatar.serve.app import create_app
    from avatar.serve.store import JobStore

    cfg = compose(["model=tiny"])
    cfg = replace(cfg, serve=replace(cfg.serve, api_key="k", max_queue=2, max_image_mb=0.5, max_audio_seconds=3))
    store = JobStore(tmp_path / "state")
    with TestClient(create_app(cfg, store)) as client:
        client.store = store
        yield client
    store.close()


def _files(image: bytes, audio: bytes, image_name="face.jpg", audio_name="talk.wav"):
    return {"image": (image_name, io.BytesIO(image)), "audio": (audio_name, io.BytesIO(audio))}


def test_app_key_limits_messages_queue_status_and_content(app_client, tmp_path):
    import numpy as np
    import soundfile as sf

    client, key = app_client, {"Authorization": "Bearer k"}
    portrait = (EXAMPLES / "portrait.jpg").read_bytes()
    speech = io.BytesIO()
    sf.write(speech, np.zeros(16000, np.float32), 16000, format="WAV")
    speech = speech.getvalue()
    assert client.get("/healthz").json()["status"] == "ok"
    assert "<form" in client.get("/").text
    assert client.get("/v1/videos").status_code == 401
    assert client.post("/v1/videos", files=_files(portrait, speech)).status_code == 401

    missing = client.post("/v1/videos", files={"image": ("a.jpg", io.BytesIO(portrait))}, headers=key)
    assert missing.status_code == 400 and missing.json()["error"].startswith("missing audio")
    big = client.post("/v1/videos", files=_files(portrait + b"\0" * (1 << 20), speech), headers=key)
    assert big.status_code == 413 and "serve.max_image_mb" in big.json()["error"]
    text = client.post("/v1/videos", files=_files(b"hello\n", speech, image_name="../../etc/notes.txt"), headers=key)
    assert text.status_code == 400 and text.json()["error"].startswith("image=notes.txt: not a readable image")
    long = io.BytesIO()
    sf.write(long, np.zeros(16000 * 4, np.float32), 16000, format="WAV")
    too_long = client.post("/v1/videos", files=_files(portrait, long.getvalue()), headers=key)
    assert too_long.status_code == 400 and "longer than serve.max_audio_seconds=3" in too_long.json()["error"]
    seed = client.post("/v1/videos", files=_files(portrait, speech), data={"seed": "x"}, headers=key)
    assert seed.status_code == 400 and seed.json()["error"].startswith("seed='x' is invalid")
    assert not any(p.name.startswith(".incoming") for p in (client.store.root / "uploads").iterdir())

    ok = client.post("/v1/videos", files=_files(portrait, speech), data={"seed": "3", "steps": "2"}, headers=key)
    assert ok.status_code == 202, ok.text
    job_id = ok.json()["id"]
    assert (client.store.upload_dir(job_id) / "image").read_bytes() == portrait
    status = client.get(f"/v1/videos/{job_id}", headers=key).json()
    assert status["status"] == "queued" and status["seed"] == 3 and status["object"] == "video"
    assert (status["progress"], status["step"], status["total_steps"], status["eta_seconds"]) == (0, 0, 2, None)
    assert status["image"] == "face.jpg" and status["queue_position"] == 0
    assert client.get(f"/v1/videos/{job_id}/content", headers=key).status_code == 409
    assert client.post("/v1/videos", files=_files(portrait, speech), headers=key).status_code == 202
    full = client.post("/v1/videos", files=_files(portrait, speech), headers=key)
    assert full.status_code == 429 and "serve.max_queue" in full.json()["error"]

    lease = client.store.claim_next()
    client.store.result_path(job_id).write_bytes(b"mp4 bytes")
    assert client.store.succeed(job_id, {"num_frames": 25}, token=lease["lease_token"])
    done = client.get(f"/v1/videos/{job_id}", headers=key).json()
    assert (
        done["status"] == "completed"
        and done["progress"] == 100
        and done["content_url"] == f"/v1/videos/{job_id}/content"
    )
    content = client.get(done["content_url"], headers=key)
    assert content.status_code == 200 and content.content == b"mp4 bytes"
    assert content.headers["content-type"] == "video/mp4"
    assert len(client.get("/v1/videos", headers=key).json()["data"]) == 2


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_serve_settings_are_checked_before_anything_is_built(tiny_weights, tmp_path, capsys):
    from avatar.compose import compose
    from avatar.config import plain
    from avatar.io.errors import InputError
    from avatar.serve.app import bind, check_serve, is_loopback
    from launch.serve import main, redacted

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    args = ["model=tiny", f"weights={tiny_weights}", f"serve.data_dir={tmp_path / 's'}"]
    assert main([*args, "serve.host=0.0.0.0"]) == 2
    assert "serve.host=0.0.0.0 is not a loopback address: set serve.api_key" in capsys.readouterr().err
    assert main([*args, "serve.max_queue=0"]) == 2
    assert "serve.max_queue=0 is invalid" in capsys.readouterr().err
    cfg = compose([*args, "serve.host=0.0.0.0", "serve.api_key=s3cret"])
    check_serve(cfg)
    assert "s3cret" not in json.dumps(plain(redacted(cfg)))
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match=r"serve.port=\d+: cannot listen"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
