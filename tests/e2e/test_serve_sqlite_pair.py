"""Two servers (``launch.serve``, API and worker each) on one SQLite store and one data folder: both work, with
leases, and no job is ever rendered twice.

The defect this replaces: a second server started on the same folder re-queued the first one's running job, rendered
it again, ended it ``failed`` and left a ``.conflict`` file. Here the first server is frozen (SIGSTOP, its lease
long) in the middle of a job while the second one starts, opens the store and renders jobs of its own: the frozen
job is never touched, and once thawed the first server completes it (one attempt, the command line's video). Then the
second server (short lease) is SIGKILLed mid-job: the first takes the job over once that lease expires and resumes
it from its checkpoint, with the uninterrupted video."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections import Counter

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS
from tests.utils.services import Service, completions, download, post_job, wait_completed, wait_http
from tests.utils.spawn import free_port

pytestmark = pytest.mark.slow

READY = r"worker \S+ \(1 rank\(s\)\) ready"


def _wait_step(store, job_id: str, step: int, services, checkpoint: bool = False, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = store.get(job_id)
        saved = not checkpoint or any(store.resume_dir(job_id).rglob("*.pt"))
        if job["status"] == "in_progress" and job["step"] >= step and saved:
            return job
        assert job["status"] in ("queued", "in_progress"), job
        assert time.monotonic() < deadline, "\n".join(s.tail(1500) for s in services)
        time.sleep(0.05)


def _freeze(service: Service, database) -> None:
    """SIGSTOP the server, never while it holds SQLite's write lock (a frozen writer would block every other one)."""
    for _ in range(50):
        service.send(signal.SIGSTOP)
        probe = sqlite3.connect(database, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            service.send(signal.SIGCONT)
            time.sleep(0.05)
        finally:
            probe.close()
    raise AssertionError("could not freeze the server outside a write")


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
    ]
    ports = [free_port(), free_port()]
    first = Service("server0", "launch.serve", [*common, f"serve.port={ports[0]}", "serve.lease_seconds=600"],
                    tmp_path / "server0.log")  # fmt: skip
    second = Service("server1", "launch.serve", [*common, f"serve.port={ports[1]}", "serve.lease_seconds=6"],
                     tmp_path / "server1.log")  # fmt: skip
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    portrait, both = EXAMPLES / "portrait.jpg", [first, second]
    try:
        first.start()
        first.wait_for(READY, 300)
        store = JobStore(data)
        held = post_job(urls[0], portrait, one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
        _wait_step(store, held, 1, both)
        _freeze(first, data / "jobs.sqlite3")  # mid-job, its lease alive

        second.start()  # opens the same store while the first server's job is in progress
        second.wait_for(READY, 300)
        wait_http(urls[1], 30, second)
        own = [post_job(urls[1], portrait, one_second_clip, seed=20 + i, steps=2) for i in range(2)]
        wait_completed(urls[1], own, 300, services=[second])
        job = store.get(held)
        assert job["status"] == "in_progress" and job["attempts"] == 1, job
        assert int(job["lease_owner"].rpartition(":")[2]) in first.pids()
        assert f"job {held}: rendering" not in second.text()

        # the second server, mid-job, SIGKILLed; the first thawed: it finishes its job, then takes the other over
        second_pids = set(second.pids())
        taken = post_job(urls[1], portrait, one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
        job = _wait_step(store, taken, 1, both, checkpoint=True)
        second.kill()
        assert int(job["lease_owner"].rpartition(":")[2]) in second_pids
        first.send(signal.SIGCONT)
        done = wait_completed(urls[0], [held, taken], 240, services=[first])
        assert store.get(held)["attempts"] == 1 and done[held]["resumed_from_step"] is None
        assert store.get(taken)["attempts"] == 2 and (done[taken]["resumed_from_step"] or 0) >= 1, done[taken]
        assert f"job {taken}: the lease of {job['lease_owner']} expired" in first.text()
        counts = Counter(completions(both))
        assert {j: counts[j] for j in [held, *own, taken]} == dict.fromkeys([held, *own, taken], 1), counts
        reference = read_frames(cli_reference)
        for job_id in (held, taken):
            frames = read_frames(download(urls[0], job_id, tmp_path / f"{job_id}.mp4"))
            np.testing.assert_array_equal(frames, reference)
        assert not [p.name for p in (data / "results").iterdir() if "conflict" in p.name]
        store.close()
    finally:
        first.kill()
        second.kill()
