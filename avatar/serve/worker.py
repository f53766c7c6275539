"""The worker loop every rank of the server runs: one job at a time across all ranks, through the one ``Renderer``.

Rank 0 takes the next job from the ``JobStore`` and broadcasts it (with the uploaded files' bytes, so ranks on
other nodes need no shared folder); every rank renders it together under the launch's plan, exactly as the command
line does (same ``Renderer.render``, same resume state, same report). Between jobs the ranks meet once per
``IDLE_SECONDS`` (one tiny all-reduce and a broadcast), so an idle server never runs into a collective timeout and a
stop request is agreed on by all ranks. A preemption signal (SIGTERM/SIGUSR1) during a job checkpoints it at the
next step boundary and puts it back at the head of the queue; the loop then ends and the launcher exits with 75.
``DELETE /v1/videos/{id}`` of the running job stops it the same way after the next step (``avatar/serve/watch.py``),
but the job is dropped with its files and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from avatar.pipeline.job import Job
from avatar.pipeline.resume import Preempted
from avatar.pipeline.state import StateStore
from avatar.serve.watch import JobWatch

log = logging.getLogger(__name__)

#: Longest wait between two meetings of idle ranks (also the longest delay before an idle server sees a stop).
IDLE_SECONDS = 1.0


@dataclass
class Outcome:
    """How the loop ended: ``preempted`` (a job was checkpointed and re-queued) or a plain stop."""

    preempted: bool = False
    jobs_done: int = 0


def serve_jobs(renderer, topo, store, preemption, wake: threading.Event | None, strategy: str) -> Outcome:
    """Run jobs until a stop is requested (every rank calls this; ``store`` and ``wake`` only matter on rank 0)."""
    outcome = Outcome()
    scratch = tempfile.TemporaryDirectory(prefix="avatar-serve-") if not topo.is_main else None
    try:
        while True:
            if topo.all_reduce_max(1.0 if preemption.requested else 0.0) > 0:
                log.warning("stop requested: no job running, the server stops")
                return outcome
            command = _next_command(store) if topo.is_main else None
            command = topo.broadcast_object(command)
            if command is None:
                if topo.is_main and wake is not None:
                    wake.wait(IDLE_SECONDS)
                    wake.clear()
                continue
            if not run_job(renderer, topo, store, preemption, command, strategy, scratch):
                outcome.preempted = True
                return outcome
            outcome.jobs_done += 1
    finally:
        if scratch is not None:
            scratch.cleanup()


def _next_command(store) -> dict | None:
    job = store.claim_next()
    if job is None:
        return None
    folder = store.upload_dir(job["id"])
    return {
        "job": job,
        "image": str(folder / "image"),
        "audio": str(folder / "audio"),
        "output": str(store.result_path(job["id"])),
        "resume": str(store.resume_dir(job["id"])),
        "files": {name: (folder / name).read_bytes() for name in ("image", "audio")},
    }


def _local_file(path: str, data: bytes, scratch, job_id: str, name: str) -> str:
    """The upload as this rank sees it: the stored file when this rank can read it, else a private copy."""
    try:
        if os.path.getsize(path) == len(data):
            return path
    except OSError:
        pass
    folder = Path(scratch.name) / job_id
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / name
    copy.write_bytes(data)
    return str(copy)


def run_job(renderer, topo, store, preemption, command: dict, strategy: str, scratch) -> bool:
    """Render one job on every rank. Returns False when it was preempted (checkpointed and queued again)."""
    spec = command["job"]
    job_id = spec["id"]
    image, audio = command["image"], command["audio"]
    if not topo.is_main:
        image = _local_file(image, command["files"]["image"], scratch, job_id, "image")
        audio = _local_file(audio, command["files"]["audio"], scratch, job_id, "audio")
    job = Job(
        image=image,
        audio=audio,
        prompt=spec["prompt"],
        output=command["output"],
        seed=int(spec["seed"]),
        steps=int(spec["steps"]),
        strategy=strategy,
        videoid=job_id,
    )
    state = StateStore(command["resume"])
    watch = JobWatch(store, spec, topo, preemption, command["output"])  # progress, and DELETE's stop at each step
    if topo.is_main:
        note = f", resuming after step {spec['checkpoint_step']}" if spec.get("checkpoint_step") else ""
        log.info("job %s: rendering (attempt %d%s)", job_id, spec["attempts"], note)

    try:
        report = renderer.render(job, state=state, preemption=watch, on_step=watch.on_step if topo.is_main else None)
    except Preempted as stop:
        if watch.agreed_cancel():
            if topo.is_main:
                watch.drop(stop.step)
            else:
                shutil.rmtree(Path(scratch.name) / job_id, ignore_errors=True)
            return True
        if topo.is_main:
            store.requeue(job_id, stop.step)
            log.warning(
                "job %s: checkpointed after step %d; it continues when the server is started again", job_id, stop.step
            )
        return False
    except Exception as err:  # noqa: BLE001 - a failed job is reported; the server goes on
        if topo.is_main:
            log.exception("job %s failed", job_id)
            store.fail(job_id, f"{type(err).__name__}: {err}")
        return True
    if topo.is_main and watch.cancelled_at_end():
        watch.drop(None)
    elif topo.is_main:
        store.succeed(job_id, report)
        shutil.rmtree(command["resume"], ignore_errors=True)
        log.info("job %s: succeeded (%s)", job_id, command["output"])
    if not topo.is_main:
        shutil.rmtree(Path(scratch.name) / job_id, ignore_errors=True)
    return True
