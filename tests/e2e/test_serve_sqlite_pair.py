"""Two servers (``launch.serve``, API and worker each) on one SQLite store and one data folder: both work, with
leases, and no job is ever rendered twice.

The defect this replaces: a second server started on the same folder re-queued the first one's running job, rendered
it again, ended it ``failed`` and left a ``.conflict`` file. Here the second server starts while the first renders a
long job and renders jobs of its own meanwhile; the long job stays the first server's (one attempt, never rendered by
the second) until it is cancelled through the store, which stops it within a step. Then the server rendering a job is
SIGKILLed mid-job: the other one takes the job over once its lease expires and resumes it from its checkpoint, with
the uninterrupted video."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS
from tests.utils.services import Service, completions, download, post_job, wait_completed, wait_http
from tests.utils.spawn import free_port

pytestmark = pytest.mark.slow

LEASE = 6
READY = r"worker \S+ \(1 rank\(s\)\) ready"


@pytest.mark.timeout(480)
def test_two_servers_on_one_sqlite_store(tiny_weights, cli_reference, one_second_clip, tmp_path):
    from avatar.serve.store import JobStore
    from tests.utils.video import read_frames

    data = tmp_path / "data"
    common = [
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        "sampling.steps=3",
        "checkpoint_every=1",
        f"serve.data_dir={data}",  # the store: sqlite:///<data_dir>/jobs.sqlite3
        f"serve.lease_seconds={LEASE}",
    ]
    ports = [free_port(), free_port()]
    first, second = (
        Service(f"server{i}", "launch.serve", [*common, f"serve.port={port}"], tmp_path / f"server{i}.log")
        for i, port in enumerate(ports)
    )
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    portrait = EXAMPLES / "portrait.jpg"
    try:
        first.start()
        first.wait_for(READY, 300)
        store = JobStore(data)
        # a long job on the first server (5 s of speech, 100 steps), and the second server started while it renders
        long_job = post_job(urls[0], portrait, EXAMPLES / "speech_5s.wav", seed=1, steps=100)
        deadline = time.monotonic() + 120
        while (store.get(long_job) or {}).get("step", 0) < 1:
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.1)
        second.start()
        second.wait_for(READY, 300)
        wait_http(urls[1], 30, second)
        more = [post_job(urls[1], portrait, one_second_clip, seed=20 + i, steps=2) for i in range(2)]
        done = wait_completed(urls[1], more, 300, services=[first, second])
        running = store.get(long_job)
        assert running["status"] == "in_progress", ("the long job ended before the second server worked", running)
        assert running["attempts"] == 1 and int(running["lease_owner"].rpartition(":")[2]) in first.pids()
        assert f"job {long_job}: rendering" not in second.text()
        # a cancel reaches the first server's group at its next step; the job is never completed, never failed
        step = running["step"]
        assert store.request_cancel(long_job) == "in_progress"
        deadline = time.monotonic() + 120
        while (job := store.get(long_job))["status"] == "in_progress":
            assert time.monotonic() < deadline, first.tail()
            time.sleep(0.1)
        assert job["status"] == "cancelled" and job["attempts"] == 1 and job["step"] <= step + 2, job
        assert not store.upload_dir(long_job).exists() and not store.result_path(long_job).exists()
        counts = Counter(completions([first, second]))
        assert {job: counts[job] for job in [long_job, *more]} == {long_job: 0, **dict.fromkeys(more, 1)}, counts
        assert all(d["resumed_from_step"] is None for d in done.values())
        assert not [p.name for p in (data / "results").iterdir() if "conflict" in p.name]

        # SIGKILL the server rendering a job: the other takes it over after the lease
        job_id = post_job(urls[0], portrait, one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
        deadline = time.monotonic() + 120
        while True:
            job = store.get(job_id)
            if job["status"] == "in_progress" and job["step"] >= 2 and list(store.resume_dir(job_id).rglob("*.pt")):
                break
            assert time.monotonic() < deadline, first.tail() + second.tail()
            time.sleep(0.05)
        owner_pid = int(job["lease_owner"].rpartition(":")[2])
        victim, survivor = (first, second) if owner_pid in first.pids() else (second, first)
        survivor_url = urls[1] if victim is first else urls[0]
        victim.kill()
        taken = wait_completed(survivor_url, [job_id], 180, services=[survivor])[job_id]
        assert store.get(job_id)["attempts"] == 2
        assert taken["resumed_from_step"] is not None and taken["resumed_from_step"] >= 1, taken
        assert Counter(completions([first, second]))[job_id] == 1
        frames = read_frames(download(survivor_url, job_id, tmp_path / "taken-over.mp4"))
        np.testing.assert_array_equal(frames, read_frames(cli_reference))
        store.close()
    finally:
        first.kill()
        second.kill()
