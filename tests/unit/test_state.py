"""Resume store: done marks, atomic checksummed checkpoints (truncation and bit flips detected), change reasons."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
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


# --- issue 22: one owner per output, leftovers, the report of a finished job ---------------------------------------


def test_lock_has_one_owner_and_names_it(tmp_path):
    import os
    import socket

    from avatar.io.errors import OutputBusy
    from avatar.pipeline.state import StateLock, lock_for_run
    from avatar.pipeline.topology import Topology

    folder = tmp_path / "out" / ".state"
    first = lock_for_run(Topology(), folder, "output_dir=out")
    assert first.held and (folder / "lock").is_file()
    with pytest.raises(OutputBusy) as err:
        lock_for_run(Topology(), folder, "output_dir=out")
    message = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "batch.wait_for_lock=true" in message
    assert "output_dir=out is in use by another run" in message
    other = StateLock(folder, "x")
    assert not other.try_acquire()
    first.release()
    assert other.try_acquire()
    other.release()


def test_waiting_lock_gives_up_when_asked_to_stop(tmp_path):
    from avatar.io.errors import OutputBusy
    from avatar.pipeline.state import StateLock, lock_for_run
    from avatar.pipeline.topology import Topology

    folder = tmp_path / "o.mp4.state"
    with StateLock(folder, "output=o.mp4") as held:
        assert held.try_acquire()
        asked = iter([False, False, True])
        with pytest.raises(OutputBusy, match="stopped while waiting: output=o.mp4 is in use"):
            lock_for_run(Topology(), folder, "output=o.mp4", wait=True, stop=lambda: next(asked), poll=0.01)


def test_lock_follows_a_folder_removed_by_the_previous_holder(tmp_path):
    """A finished single render removes ``<output>.state`` (its lock file with it) while holding the lock: a waiter
    that opened the old file must lock the new one, never hold a lock nobody else can see."""
    import shutil

    from avatar.pipeline.state import StateLock

    folder = tmp_path / "o.mp4.state"
    holder = StateLock(folder, "o")
    assert holder.try_acquire()
    waiter = StateLock(folder, "o")
    assert not waiter.try_acquire()
    shutil.rmtree(folder)
    holder.release()
    assert waiter.try_acquire() and (folder / "lock").is_file()
    assert not StateLock(folder, "o").try_acquire()
    waiter.release()


def test_leftover_checkpoint_temporaries_are_removed_by_the_next_owner(tmp_path):
    from avatar.pipeline.state import lock_for_run
    from avatar.pipeline.topology import Topology

    store = StateStore(tmp_path / ".state")
    store.save_checkpoint("k" * 8, 2, {"latents": torch.zeros(2)}, {"strategy": "shift"})
    job = tmp_path / ".state" / "jobs" / ("k" * 8)
    killed = [job / ".checkpoint.pt.x1y2z3ab.tmp", job / ".checkpoint.pt.abcdef-4242-0badf00d.tmp"]
    killed.append(job / "segments" / ".000001.pt.q9w8e7.tmp")
    parts = tmp_path / ".state" / "summaries" / "0123456789ab-0.json"
    for path in [*killed, parts]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    lock = lock_for_run(Topology(), tmp_path / ".state", "output_dir=x")
    try:
        assert not any(path.exists() for path in [*killed, parts])
        assert store.load_checkpoint("k" * 8)[0] == 2  # the real checkpoint is kept
        assert sorted(p.name for p in job.iterdir()) == ["checkpoint.pt", "segments"]
    finally:
        lock.release()


def test_checkpoint_temporaries_carry_host_and_pid(tmp_path, monkeypatch):
    """A write interrupted by an exception leaves nothing; the temporary's name says who wrote it."""
    from avatar.io import atomic
    from avatar.pipeline import state as state_mod

    seen = []
    real = atomic.temp_name
    monkeypatch.setattr(state_mod, "temp_name", lambda path, tag: seen.append(real(path, tag)) or seen[-1])
    StateStore(tmp_path).save_checkpoint("a" * 8, 1, {"x": torch.ones(1)}, {})
    assert atomic.is_temp_name(Path(seen[0]).name) and Path(seen[0]).name.startswith(".checkpoint.pt.")
    assert not Path(seen[0]).exists()


def test_missing_report_is_restored_from_the_done_mark(tmp_path):
    import json

    from avatar.pipeline.state import restore_report

    store = StateStore(tmp_path / ".state")
    out = tmp_path / "v.mp4"
    out.write_bytes(b"video")
    store.mark_done("b" * 8, {"output": str(out), "report": {"frames": 5, "seconds_total": 1.5}})
    note = restore_report(store, "b" * 8, str(out))
    assert "its report was missing" in note and str(out) + ".json" in note
    assert json.loads((tmp_path / "v.mp4.json").read_text()) == {"frames": 5, "seconds_total": 1.5}
    assert restore_report(store, "b" * 8, str(out)) is None
    store.mark_done("c" * 8, {"output": str(out)})  # a done mark of an older run: no report kept
    (tmp_path / "v.mp4.json").unlink()
    assert "was not kept in the resume state" in restore_report(store, "c" * 8, str(out))


def test_state_folder_that_is_a_file_is_refused(tmp_path):
    from avatar.io.errors import InputError
    from avatar.pipeline.state import check_state_folder

    (tmp_path / "o.mp4.state").write_text("not a folder")
    with pytest.raises(InputError, match=r"output=o.mp4: its resume state folder .*o.mp4.state exists and is not"):
        check_state_folder(tmp_path / "o.mp4.state", "output=o.mp4")
    (tmp_path / "d" / "lock").mkdir(parents=True)
    with pytest.raises(InputError, match="lock exists and is not a regular file"):
        check_state_folder(tmp_path / "d", "output_dir=d")
    check_state_folder(tmp_path / "absent", "output=x.mp4")


def test_shards_of_an_array_share_the_folder_but_not_a_shard(tmp_path):
    """Slurm array tasks render their shards into one output_dir side by side; the same shard twice, or an
    unsharded run beside them, is refused naming who is in the way."""
    import os

    from avatar.pipeline.state import StateLock

    folder = tmp_path / ".state"
    first, second = StateLock(folder, "output_dir=o", (0, 2)), StateLock(folder, "output_dir=o", (1, 2))
    assert first.try_acquire() and second.try_acquire()
    again = StateLock(folder, "output_dir=o", (1, 2))
    assert not again.try_acquire()
    assert f"(shard 1 of 2) is in use by another run (pid {os.getpid()}" in again.busy_message()
    assert "lock.shard-1-of-2" in again.busy_message()
    whole = StateLock(folder, "output_dir=o")
    assert not whole.try_acquire()
    message = whole.busy_message()
    assert message.count(f"pid {os.getpid()}") == 2 and "shard 0 of 2" in message and "shard 1 of 2" in message
    first.release()
    second.release()
    assert whole.try_acquire()
    assert not StateLock(folder, "output_dir=o", (0, 2)).try_acquire()
    whole.release()


def test_a_shard_removes_only_temporaries_of_processes_that_are_gone(tmp_path):
    from avatar.io.atomic import HOST

    store = StateStore(tmp_path)
    job = tmp_path / "jobs" / "key"
    job.mkdir(parents=True)
    mine = job / f".checkpoint.pt.{HOST}-{os.getpid()}-0badf00d.tmp"  # a sibling shard's write in progress (alive)
    dead = job / f".checkpoint.pt.{HOST}-999999999-0badf00d.tmp"
    legacy = job / ".checkpoint.pt.x1y2z3.tmp"  # no pid in the name: only the exclusive owner can tell
    part = tmp_path / "summaries" / "run-0.json"
    part.parent.mkdir()
    for path in (mine, dead, legacy, part):
        path.write_bytes(b"x")
    assert store.remove_leftovers(exclusive=False) == [dead]
    assert mine.exists() and legacy.exists() and part.exists()
    assert set(store.remove_leftovers(exclusive=True)) == {mine, legacy, part}
