"""Serving past one process group: two API front ends (``launch.serve serve.role=api``) and three worker groups
(``launch.worker``: two single processes and one 2-rank gloo torchrun group) on one real PostgreSQL store
(``postgres_server`` in ``tests/conftest.py``; skipped with the reason where none can be started) and one data
folder, all with the tiny model, driven by a plain HTTP client.

12 jobs posted to both front ends all complete, each exactly once (one ``completed`` line over all the workers'
logs), every worker renders some, the reference jobs' videos equal the command line's for the same seed and the
others differ from each other. Then one worker is SIGKILLed in the middle of a job: the job goes back to the queue
when its lease expires, another worker resumes it from its checkpoint, and its video equals the uninterrupted one."""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS
from tests.utils.services import (
    Service,
    completions,
    download,
    post_job,
    wait_completed,
    wait_http,
)
from tests.utils.spawn import free_port

pytestmark = pytest.mark.slow

#: Short leases so a killed worker's job is taken over quickly (heartbeats every quarter of it).
LEASE = 6


@pytest.fixture(scope="module")
def cluster(postgres_server, tiny_weights, tmp_path_factory):
    from avatar.serve.store import JobStore

    folder = tmp_path_factory.mktemp("workers")
    url = postgres_server.create_database("serve_workers")
    common = [
        *FRONTEND_SETTINGS,
        f"weights={tiny_weights}",
        "sampling.steps=3",
        "checkpoint_every=1",
        f"serve.store={url}",
        f"serve.data_dir={folder / 'data'}",
        f"serve.lease_seconds={LEASE}",
    ]
    ports = [free_port(), free_port()]
    fronts = [
        Service(f"api{i}", "launch.serve", [*common, "serve.role=api", f"serve.port={port}"], folder / f"api{i}.log")
        for i, port in enumerate(ports)
    ]
    workers = [
        Service("worker-a", "launch.worker", common, folder / "worker-a.log"),
        Service("worker-b", "launch.worker", common, folder / "worker-b.log"),
        Service("worker-2ranks", "launch.worker", common, folder / "worker-2ranks.log", nproc=2),
    ]
    services = [*fronts, *workers]
    try:
        for service in services:
            service.start()
        for front, port in zip(fronts, ports):
            wait_http(f"http://127.0.0.1:{port}", 240, front)
        for worker in workers:
            worker.wait_for(r"worker \S+ \((\d) rank\(s\)\) ready", 300)
        store = JobStore(folder / "data", url)
        yield {
            "urls": [f"http://127.0.0.1:{port}" for port in ports],
            "fronts": fronts,
            "workers": workers,
            "store": store,
            "folder": folder,
        }
        store.close()
    finally:
        for service in services:
            service.kill()


def _owner_pid(job: dict) -> int:
    return int(job["lease_owner"].rpartition(":")[2])


@pytest.mark.timeout(420)
def test_twelve_jobs_on_two_fronts_three_workers(cluster, cli_reference, one_second_clip, tmp_path):
    from tests.utils.video import read_frames

    urls, workers, store = cluster["urls"], cluster["workers"], cluster["store"]
    portrait = EXAMPLES / "portrait.jpg"
    # every third job: the reference (seed, steps) of the command line; the others: their own seeds, 2 steps
    specs = [(REFERENCE_SEED, REFERENCE_STEPS) if i % 3 == 0 else (100 + i, 2) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        ids = list(
            pool.map(
                lambda item: post_job(item[1], portrait, one_second_clip, seed=item[0][0], steps=item[0][1]),
                zip(specs, itertools.cycle(urls)),
            )
        )
    done = wait_completed(urls[1], ids, 300, services=[*cluster["fronts"], *workers])
    assert set(done) == set(ids)

    counts = Counter(completions(workers))
    assert {job: counts[job] for job in ids} == dict.fromkeys(ids, 1), counts  # each completed exactly once
    owners = {store.get(job)["lease_owner"] for job in ids}
    pids = {worker.name: set(worker.pids()) for worker in workers}
    by_worker = {name for name, tree in pids.items() for owner in owners if int(owner.rpartition(":")[2]) in tree}
    assert by_worker == {w.name for w in workers}, (owners, pids)  # every group rendered some
    assert all(store.get(job)["percent"] == 100 for job in ids)

    reference = read_frames(cli_reference)
    others = []
    for i, job in enumerate(ids):
        frames = read_frames(download(urls[i % 2 - 1], job, tmp_path / f"{job}.mp4"))
        if i % 3 == 0:
            np.testing.assert_array_equal(frames, reference)
        else:
            assert frames.shape == reference.shape
            others.append(frames)
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(others, 2))
    results = cluster["folder"] / "data" / "results"
    assert not [p.name for p in results.iterdir() if "conflict" in p.name or p.name.startswith(".")]


@pytest.mark.timeout(300)
def test_sigkill_mid_job_is_taken_over_after_the_lease(cluster, cli_reference, one_second_clip, tmp_path):
    from tests.utils.video import read_frames

    urls, workers, store = cluster["urls"], cluster["workers"], cluster["store"]
    trees = [(worker, set(worker.pids())) for worker in workers]  # looked up before: the kill follows the read at once
    job_id = post_job(urls[0], EXAMPLES / "portrait.jpg", one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
    deadline = time.monotonic() + 120
    while True:  # in progress, with a checkpoint on disk
        job = store.get(job_id)
        if job["status"] == "in_progress" and job["step"] >= 1 and any(store.resume_dir(job_id).rglob("*.pt")):
            break
        assert job["status"] in ("queued", "in_progress"), job
        assert time.monotonic() < deadline, [w.tail(1500) for w in workers]
        time.sleep(0.05)
    victim = next(worker for worker, tree in trees if _owner_pid(job) in tree)
    killed_at = time.monotonic()
    victim.kill()
    first_owner = job["lease_owner"]

    survivors = [w for w in workers if w is not victim]
    done = wait_completed(urls[1], [job_id], 180, services=survivors)[job_id]
    assert time.monotonic() - killed_at >= LEASE - 1  # not before the lease ran out
    final = store.get(job_id)
    assert final["attempts"] == 2 and final["lease_owner"] != first_owner, final
    resumed = done["resumed_from_step"]
    assert resumed is not None and 1 <= resumed < REFERENCE_STEPS, done  # killed mid-job, resumed from a checkpoint
    assert any(f"job {job_id}: the lease of {first_owner} expired" in w.text() for w in survivors)
    assert Counter(completions(workers))[job_id] == 1
    frames = read_frames(download(urls[0], job_id, tmp_path / "taken-over.mp4"))
    np.testing.assert_array_equal(frames, read_frames(cli_reference))
    assert not store.resume_dir(job_id).exists()
    assert os.path.isfile(store.result_path(job_id))
