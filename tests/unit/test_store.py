"""The job store on both of its databases: SQLite (a file) and a real PostgreSQL server (``postgres_server`` in
``tests/conftest.py``; these cases skip with the reason where none can be started). Concurrent claimers never get the
same job, an expired lease puts the job back in its place, every worker update is conditional on its lease token,
cancel, migrations and storage faults."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from avatar.serve.store import CANCEL, HOLDS, LOST, JobStore, StoreError, new_id


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'jobs.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def _open(tmp_path, url) -> JobStore:
    return JobStore(tmp_path / "data", url)


def _add(store, job_id=None, **kw) -> str:
    job_id = job_id or new_id()
    store.upload_dir(job_id).mkdir(parents=True, exist_ok=True)
    (store.upload_dir(job_id) / "image").write_bytes(b"img")
    fields = dict(prompt="p", seed=1, steps=4, image_name="a.png", audio_name="b.wav") | kw
    assert store.add(job_id, **fields)
    return job_id


def test_order_progress_preemption_reopen(tmp_path, store_url):
    store = _open(tmp_path, store_url)
    assert store.schema_version() == 1
    first, second = _add(store), _add(store, seed=2**63 - 2, params={"strategy": "segments"})
    assert not store.add(new_id(), prompt="p", seed=1, steps=4, image_name="a", audio_name="b", max_active=2)
    assert store.count_active() == 2 and store.position(second) == 1
    job = store.claim_next("w1", lease_seconds=30)
    assert job["id"] == first and job["status"] == "in_progress" and job["attempts"] == 1
    assert job["lease_owner"] == "w1" and job["started"] is not None and len(job["lease_token"]) == 32
    token = job["lease_token"]
    assert store.progress(first, 2, 4, token=token, eta_at=time.time() + 20) == HOLDS
    seen = store.get(first)
    assert seen["step"] == 2 and 15 < seen["eta_seconds"] <= 20 and "lease_token" not in seen
    assert store.requeue(first, 2, token=token)  # preempted: back at the head of the queue
    again = store.claim_next("w2", lease_seconds=30)
    assert again["id"] == first and again["checkpoint_step"] == 2 and again["attempts"] == 2
    assert store.succeed(first, {"num_frames": 25, "denoise": {"resumed_from_step": 2}}, token=again["lease_token"])
    store.close()

    reopened = _open(tmp_path, store_url)  # the schema is not applied twice
    assert reopened.schema_version() == 1
    done = reopened.get(first)
    assert done["status"] == "completed" and done["resumed_from_step"] == 2 and done["report"]["num_frames"] == 25
    assert done["step"] == done["total"] and done["eta_seconds"] is None
    nxt = reopened.claim_next("w3")
    assert nxt["id"] == second and nxt["seed"] == 2**63 - 2 and nxt["params"] == {"strategy": "segments"}
    assert reopened.fail(second, "RuntimeError: boom\nsecond line", token=nxt["lease_token"])
    assert reopened.get(second)["error"] == "RuntimeError: boom second line"
    assert reopened.claim_next("w3") is None
    assert [j["id"] for j in reopened.list()] == [second, first]
    assert [j["id"] for j in reopened.list(limit=1, after=second)] == [first]
    assert reopened.get("../../etc/passwd") is None
    with pytest.raises(ValueError):
        reopened.upload_dir("../x")
    reopened.close()


def _claim_all(url, data, owner, claimed, errors):
    try:
        store = JobStore(data, url)
        while (job := store.claim_next(owner, lease_seconds=60)) is not None:
            claimed.append((job["id"], owner))
            assert store.succeed(job["id"], {}, token=job["lease_token"])
        store.close()
    except BaseException as err:  # noqa: BLE001 - reported by the test
        errors.append(err)


def test_concurrent_claims_never_give_one_job_twice(tmp_path, store_url):
    store = _open(tmp_path, store_url)
    ids = {_add(store) for _ in range(40)}
    claimed, errors = [], []
    threads = [
        threading.Thread(target=_claim_all, args=(store_url, tmp_path / "data", f"w{i}", claimed, errors))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sorted(i for i, _ in claimed) == sorted(ids)  # each exactly once
    assert all(store.get(i)["status"] == "completed" and store.get(i)["attempts"] == 1 for i in ids)
    assert store.count_active() == 0


def test_expired_lease_requeues_and_the_old_holder_changes_nothing(tmp_path, store_url):
    store = _open(tmp_path, store_url)
    first, second = _add(store), _add(store)
    old = store.claim_next("dead", lease_seconds=0.5)
    assert old["id"] == first
    assert store.heartbeat(first, token=old["lease_token"], lease_seconds=0.5) == HOLDS
    time.sleep(0.8)
    assert store.requeue_expired() == [first]
    assert store.get(first)["status"] == "queued" and store.get(first)["lease_owner"] is None
    new = store.claim_next("alive", lease_seconds=30)  # the expired job first: it keeps its place
    assert new["id"] == first and new["attempts"] == 2
    token = old["lease_token"]
    assert store.heartbeat(first, token=token) == LOST
    assert store.progress(first, 3, 4, token=token) == LOST
    assert not store.succeed(first, {}, token=token)
    assert not store.fail(first, "late", token=token)
    assert not store.requeue(first, 3, token=token)
    assert store.get(first)["status"] == "in_progress" and store.get(first)["lease_owner"] == "alive"
    assert store.succeed(first, {"num_frames": 1}, token=new["lease_token"])
    # a worker whose lease ran out but that nobody replaced may still finish; a finished job is never failed
    late = store.claim_next("slow", lease_seconds=0.3)
    assert late["id"] == second
    time.sleep(0.5)
    assert store.succeed(second, {}, token=late["lease_token"])
    assert not store.fail(second, "too late", token=late["lease_token"])
    assert store.get(second)["status"] == "completed" and store.get(second)["error"] is None
    assert store.claim_next("alive") is None


def test_cancel_queued_running_and_expired_then_delete(tmp_path, store_url):
    store = _open(tmp_path, store_url)
    queued, running, orphan = _add(store), _add(store), _add(store)
    first = store.claim_next("w", lease_seconds=30)
    assert first["id"] == queued
    assert store.requeue(queued, None, token=first["lease_token"])
    assert store.request_cancel(queued) == "cancelled"  # queued: at once, files freed
    assert not store.upload_dir(queued).exists() and store.get(queued)["finished"] is not None
    job = store.claim_next("w", lease_seconds=30)
    assert job["id"] == running
    store.result_path(running).write_bytes(b"partial")
    assert not store.cancel_requested(running)
    assert store.request_cancel(running) == "in_progress"  # running: asked; the worker stops at its next step
    assert store.get(running)["cancel_requested"] and store.cancel_requested(running)
    assert store.progress(running, 1, 4, token=job["lease_token"]) == CANCEL
    assert store.heartbeat(running, token=job["lease_token"]) == CANCEL
    assert not store.mark_cancelled(running, 1, token="not-the-token")
    assert store.mark_cancelled(running, 1, token=job["lease_token"])
    done = store.get(running)
    assert done["status"] == "cancelled" and done["step"] == 1
    assert not store.upload_dir(running).exists() and not store.result_path(running).exists()
    dead = store.claim_next("dead", lease_seconds=0.3)
    assert dead["id"] == orphan and store.request_cancel(orphan) == "in_progress"
    time.sleep(0.5)
    assert store.claim_next("w") is None  # the expired, cancelled job is finished as cancelled, not run again
    assert store.get(orphan)["status"] == "cancelled" and not store.upload_dir(orphan).exists()
    assert store.request_cancel(orphan) == "cancelled" and store.request_cancel(new_id()) is None
    assert store.delete(orphan) and store.get(orphan) is None and not store.delete(orphan)
    active = _add(store)
    assert not store.delete(active) and store.get(active)["status"] == "queued"  # only finished jobs go


def test_paging_segments_and_percent(tmp_path, store_url):
    store = _open(tmp_path, store_url)
    ids = [_add(store) for _ in range(5)]
    jobs, more = store.page(2)
    assert [j["id"] for j in jobs] == ids[:2:-1] and more
    jobs, more = store.page(2, after=jobs[-1]["id"])
    assert [j["id"] for j in jobs] == [ids[2], ids[1]] and more
    jobs, more = store.page(2, after=jobs[-1]["id"])
    assert [j["id"] for j in jobs] == [ids[0]] and not more
    assert [j["id"] for j in store.page(3, order="asc")[0]] == ids[:3]
    assert store.page(2, after=new_id()) == ([], False)
    store.set_segments(ids[0], 3)
    job = store.claim_next("w")
    assert job["segments"] == 3 and job["percent"] == 0
    assert store.progress(ids[0], 2, 4, token=job["lease_token"]) == HOLDS
    assert store.get(ids[0])["percent"] == 50
    assert store.progress(ids[0], 4, 4, token=job["lease_token"], percent=100) == HOLDS
    assert store.get(ids[0])["percent"] == 99  # 100 only once the video is published
    assert store.succeed(ids[0], {}, token=job["lease_token"])
    assert store.get(ids[0])["percent"] == 100


def test_migrations_recorded_and_checked(tmp_path, store_url):
    stores = []

    def open_one():
        stores.append(_open(tmp_path, store_url))

    threads = [threading.Thread(target=open_one) for _ in range(3)]  # servers starting together migrate once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(stores) == 3 and {s.schema_version() for s in stores} == {1}
    store = stores[0]
    with store._guard():
        rows = store._backend.rows("SELECT version, name FROM schema_version")
        assert rows == [{"version": 1, "name": "jobs"}]
        store._backend.execute("INSERT INTO schema_version (version, name, applied) VALUES (2, 'future', 0)")
    for s in stores:
        s.close()
    with pytest.raises(StoreError, match="has schema version 2; this version of the code knows up to 1"):
        _open(tmp_path, store_url)


def test_store_faults_are_one_line(tmp_path):
    from tests.utils.spawn import free_port

    with pytest.raises(StoreError, match=r"^serve.store=ftp://x is not a store URL; give sqlite:///PATH"):
        JobStore(tmp_path, "ftp://x")
    closed = f"postgresql://avatar:hunter2@127.0.0.1:{free_port()}/x"  # nothing listens there
    with pytest.raises(StoreError) as err:
        JobStore(tmp_path, closed)
    assert "hunter2" not in str(err.value) and "avatar:***@" in str(err.value) and "\n" not in str(err.value)

    old = tmp_path / "old.sqlite3"  # a store of the server before migrations
    sqlite3.connect(old).execute("CREATE TABLE jobs (id TEXT)").connection.commit()
    with pytest.raises(StoreError, match="holds a jobs table of an older server"):
        JobStore(tmp_path, f"sqlite:///{old}")
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="corrupt.sqlite3: file is not a database"):
        JobStore(tmp_path, f"sqlite:///{corrupt}")
    store = JobStore(tmp_path / "d", f"sqlite:///{tmp_path / 'ok.sqlite3'}")
    store._backend.db.execute("PRAGMA query_only = 1")  # the database turned read-only under a running server
    with pytest.raises(StoreError, match="attempt to write a readonly database"):
        _add(store)
    store.close()
