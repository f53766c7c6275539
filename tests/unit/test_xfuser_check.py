"""The xfuser backend's token rule is a pure function checked by ``avatar.validate`` (and the server, per upload)
before any model (xfuser itself does not import on a CPU torch), and ``avatar/attention`` no longer imports
``avatar/parallel`` (no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import Image

from avatar.compose import compose
from avatar.io.errors import InputError
from avatar.parallel.xfuser import xfuser_token_problem
from avatar.validate import check_job, check_xfuser_image

ROOT = Path(__file__).resolve().parents[2]


def test_token_problem_names_the_count_the_degree_and_what_is_valid():
    # 704×704: 44×44 = 1936 tokens per latent frame; 8 ranks divide them, 24 do not.
    assert xfuser_token_problem(1936, 8) is None
    assert xfuser_token_problem(1936, 1) is None and xfuser_token_problem(7, 1) is None
    problem = xfuser_token_problem(1936, 24)
    assert "tokens per frame (1936)" in problem and "ring·ulysses=24" in problem
    assert "valid degrees: 1, 2, 4, 8, 11, 16, 22, 44" in problem and "attention.backend=native" in problem
    assert "\n" not in problem
    assert "the image tokens (65824)" in xfuser_token_problem(34 * 1936, 48, "image tokens")


def test_validation_refuses_the_image_before_any_model(tmp_path):
    # image_size 128: a square → 8×8 = 64 tokens/frame, 10 frames (9 window latents + the reference) = 640 tokens
    cfg = compose(["model=tiny", "attention.backend=xfuser"])
    check_xfuser_image(cfg, 300, 300, 4)
    check_xfuser_image(cfg, 300, 300, 64)
    with pytest.raises(InputError, match=r"image tokens \(640\).*ring·ulysses=3.*300×300 image → the 128×128"):
        check_xfuser_image(cfg, 300, 300, 3)
    image = tmp_path / "face.png"
    Image.new("RGB", (300, 300)).save(image)
    job = type("Job", (), {"image": str(image), "audio": str(tmp_path / "a.wav"), "steps": 3, "seed": 0})()
    with pytest.raises(InputError, match="ring·ulysses=3"):
        check_job(cfg, job, {}, sequence_degree=3)
    native = compose(["model=tiny"])  # the native backend pads: the same job passes this check (fails on audio)
    with pytest.raises(InputError, match="a.wav"):
        check_job(native, job, {}, sequence_degree=3)


def _imports(package: str) -> set[str]:
    names = set()
    for path in (ROOT / "avatar" / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
    return names


def test_attention_and_parallel_do_not_import_each_other():
    assert not any(name.startswith("avatar.parallel") for name in _imports("attention"))
    assert any(name.startswith("avatar.attention") for name in _imports("parallel"))  # one direction only
    assert not (ROOT / "avatar" / "attention" / "xfuser.py").exists()


def test_server_uploads_are_checked_against_the_plan(tmp_path):
    import io

    import numpy as np
    import soundfile as sf
    from fastapi.testclient import TestClient

    from avatar.serve.app import create_app
    from avatar.serve.store import JobStore
    from tests.e2e.conftest import EXAMPLES

    cfg = compose(["model=tiny", "attention.backend=xfuser", "serve.api_key=k"])
    portrait = (EXAMPLES / "portrait.jpg").read_bytes()  # 512×512 → the 128×128 bucket: 64 tokens per frame
    speech = io.BytesIO()
    sf.write(speech, np.zeros(16000, np.float32), 16000, format="WAV")
    store = JobStore(tmp_path / "state")
    try:
        replies = {}
        for degree in (3, 4):
            with TestClient(create_app(cfg, store, sequence_degree=degree)) as client:
                files = {"image": ("f.jpg", io.BytesIO(portrait)), "audio": ("a.wav", io.BytesIO(speech.getvalue()))}
                replies[degree] = client.post("/v1/videos", files=files, headers={"Authorization": "Bearer k"})
        assert replies[3].status_code == 400 and "image tokens (640)" in replies[3].json()["error"]
        assert "ring·ulysses=3" in replies[3].json()["error"]
        assert replies[4].status_code == 202, replies[4].text
    finally:
        store.close()
