"""Resume store: done marks, atomic checksummed checkpoints (truncation and bit flips detected), change reasons."""

from __future__ import annotations

import logging

import torch

from avatar.pipeline.state import StateStore, job_key, semantic_config


def make_inputs(tmp_path, image=b"image-bytes"):
    (tmp_path / "p.png").write_bytes(image)
    (tmp_path / "s.wav").write_bytes(b"audio-bytes")
    return {"image": tmp_path / "p.png", "audio": tmp_path / "s.wav"}


CONFIG = {"sampling": {"steps": 50, "shift": 5.0}, "seed": 1, "output": {"path": "a.mp4"}, "overwrite": False}


def test_key_ignores_non_semantic_fields_and_tracks_content(tmp_path):
    inputs = make_inputs(tmp_path)
    key = job_key(inputs, semantic_config(CONFIG))
    other_output = dict(CONFIG, output={"path": "b.mp4"}, overwrite=True)
    assert job_key(inputs, semantic_config(other_output)) == key
    assert job_key(inputs, semantic_config(dict(CONFIG, seed=2))) != key
    make_inputs(tmp_path, image=b"other-image")
    assert job_key(inputs, semantic_config(CONFIG)) != key


def test_done_mark_and_checkpoint_round_trip(tmp_path):
    store = StateStore(tmp_path / ".state")
    key = job_key(make_inputs(tmp_path), CONFIG)
    latents = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert store.load_checkpoint(key) is None and not store.is_done(key)
    store.save_checkpoint(key, 7, {"latents": latents}, {"strategy": "shift"})
    step, tensors, meta = store.load_checkpoint(key)
    assert step == 7 and meta == {"strategy": "shift"} and torch.equal(tensors["latents"], latents)
    store.save_segment(key, 0, {"latents": latents})
    store.save_segment(key, 2, {"latents": latents * 2})
    assert store.finished_segments(key) == [0, 2]
    assert torch.equal(store.load_segment(key, 2)[0]["latents"], latents * 2)
    store.mark_done(key, {"output": "a.mp4"})
    assert store.is_done(key) and store.load_checkpoint(key) is None and store.finished_segments(key) == []
    store.clear(key)
    assert not store.is_done(key)


def test_truncated_and_corrupted_checkpoints_are_ignored(tmp_path, caplog):
    store = StateStore(tmp_path)
    key = "k" * 64
    path = store.save_checkpoint(key, 3, {"x": torch.arange(1000.0)}, {})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    with caplog.at_level(logging.WARNING):
        assert store.load_checkpoint(key) is None
    assert "truncated" in caplog.text
    flipped = bytearray(blob)
    flipped[-50] ^= 0x01
    path.write_bytes(bytes(flipped))
    with caplog.at_level(logging.WARNING):
        assert store.load_checkpoint(key) is None
    assert "checksum mismatch" in caplog.text
    seg = store.save_segment(key, 1, {"x": torch.ones(3)})
    seg.write_bytes(seg.read_bytes()[:20])
    assert store.finished_segments(key) == []


def test_changed_key_is_explained(tmp_path):
    store = StateStore(tmp_path / ".state")
    inputs = make_inputs(tmp_path)
    key = job_key(inputs, CONFIG)
    assert store.register("v1", key, inputs, CONFIG) is None
    assert store.register("v1", key, inputs, CONFIG) is None
    cfg30 = {**CONFIG, "sampling": {"steps": 30, "shift": 5.0}}
    key30 = job_key(inputs, cfg30)
    assert store.register("v1", key30, inputs, cfg30) == "config changed: sampling.steps 50 → 30"
    make_inputs(tmp_path, image=b"new-image")
    key_img = job_key(inputs, cfg30)
    assert store.register("v1", key_img, inputs, cfg30) == "image file changed"
