"""The worker loop every rank of a worker group runs: one job at a time across all ranks, through the one
``Renderer``, under a lease on the shared ``JobStore``.

Rank 0 claims the oldest queued job (``JobStore.claim_next``: a lease of ``serve.lease_seconds`` under a fresh
token) and broadcasts it, with the uploaded files' bytes so ranks on other nodes can render even where they do not
see the data folder; every rank renders it together under the launch's plan, exactly as the command line does (same
``Renderer.render``, same resume state under ``<data_dir>/resume/<id>``, same report). While it renders, rank 0
heartbeats the lease from a thread (every quarter of the lease) and reports each denoising step. Every one of these
updates names the token, and each answers whether the lease still holds:

- a **cancel** was asked (``DELETE``): the group stops at the next step boundary, the job ends ``cancelled`` and its
  files are freed;
- the lease was **lost** (this worker was cut off longer than the lease, and another worker took the job over): the
  group stops at the next step boundary and leaves the job, its files and its state to the new holder;
- a preemption signal (SIGTERM/SIGUSR1) checkpoints the job at the next step boundary and queues it again at its
  place; the loop then ends and the launcher exits with 75.

The stop is the renderer's own preemption path (``Resume.stop_requested``: agreed by all ranks at each step
boundary, one all-reduce), so every rank stops after the same step. A job that fails is marked ``failed`` only while
this worker still holds it: a job another worker finished is never marked failed. Between jobs the ranks meet once
per ``IDLE_SECONDS`` (one tiny all-reduce and a broadcast), so an idle group never runs into a collective timeout and
a stop request is agreed on by all ranks.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from avatar.pipeline.resume import Preempted
from avatar.pipeline.state import StateStore
from avatar.serve.store import CANCEL, LOST, StoreError, worker_name
from avatar.serve.upload import stored_job

log = logging.getLogger(__name__)

#: Longest wait between two meetings of idle ranks (also the longest delay before an idle worker sees a new job
#: posted to another front end, or a stop).
IDLE_SECONDS = 1.0


@dataclass
class Outcome:
    """How the loop ended: ``preempted`` (a job was checkpointed and re-queued) or a plain stop."""

    preempted: bool = False
    jobs_done: int = 0


class JobStop:
    """What a render obeys as its preemption: this process's signal, or the store's word (set by the heartbeat or
    a progress update on rank 0: ``cancel`` or ``lost``)."""

    def __init__(self, signals, job_id: str = "") -> None:
        self.signals = signals
        self.job_id = job_id
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.stop_level() > 0

    def stop_level(self) -> float:
        """0 go on; 1 preempted by a signal (checkpoint at the next resumable step, queue again); 2 cancelled or
        lease lost (stop after this step, keep nothing: the job is dropped or belongs to another worker now)."""
        if self.reason is not None:
            return 2.0
        return 1.0 if self.signals is not None and self.signals.requested else 0.0

    def hear(self, verdict: str) -> None:
        if verdict == LOST:
            self.reason = "lost"
        elif verdict == CANCEL and self.reason is None:
            self.reason = "cancel"
            log.warning("job %s: cancel requested; stopping after this step", self.job_id)


class Heartbeat:
    """Rank 0's thread that extends the lease every quarter of it while the group renders."""

    def __init__(self, store, job_id: str, token: str, lease_seconds: float, stop: JobStop) -> None:
        self.store, self.job_id, self.token, self.lease = store, job_id, token, lease_seconds
        self.stop = stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._done.wait(self.lease / 4):
            try:
                verdict = self.store.heartbeat(self.job_id, token=self.token, lease_seconds=self.lease)
            except StoreError as err:
                log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, err)
                continue
            self.stop.hear(verdict)
            if verdict == LOST:
                log.warning("job %s: the lease was lost (another worker holds the job now)", self.job_id)
                return


def serve_jobs(
    renderer,
    topo,
    store,
    preemption,
    wake: threading.Event | None,
    strategy: str,
    lease_seconds: float = 60.0,
    owner: str | None = None,
) -> Outcome:
    """Run jobs until a stop is requested (every rank calls this; ``store`` and ``wake`` only matter on rank 0)."""
    outcome = Outcome()
    owner = owner or worker_name()
    scratch = tempfile.TemporaryDirectory(prefix="avatar-serve-") if not topo.is_main else None
    try:
        while True:
            if topo.all_reduce_max(1.0 if preemption.requested else 0.0) > 0:
                log.warning("stop requested: no job running, the worker stops")
                return outcome
            command = _next_command(store, owner, lease_seconds) if topo.is_main else None
            command = topo.broadcast_object(command)
            if command is None:
                if topo.is_main:
                    if wake is not None:
                        wake.wait(IDLE_SECONDS)
                        wake.clear()
                    else:
                        time.sleep(IDLE_SECONDS)
                continue
            if not run_job(renderer, topo, store, preemption, command, strategy, scratch, lease_seconds):
                outcome.preempted = True
                return outcome
            outcome.jobs_done += 1
    finally:
        if scratch is not None:
            scratch.cleanup()


def _next_command(store, owner: str, lease_seconds: float) -> dict | None:
    try:
        job = store.claim_next(owner, lease_seconds)
    except StoreError as err:
        log.warning("cannot claim a job: %s", err)
        return None
    if job is None:
        return None
    folder = store.upload_dir(job["id"])
    try:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        missing = [name for name in ("image", "audio") if name not in files]
        if missing:
            raise FileNotFoundError(errno.ENOENT, f"no {missing[0]} in it")
    except OSError as err:
        message = (
            f"the upload {folder} cannot be read ({err.strerror or err}): every worker must see the API's "
            "serve.data_dir (shared storage)"
        )
        log.error("job %s: %s", job["id"], message)
        _quietly(store.fail, job["id"], message, token=job["lease_token"])
        return None
    return {
        "job": job,
        "folder": str(folder),
        "output": str(store.result_path(job["id"])),
        "resume": str(store.resume_dir(job["id"])),
        "files": files,
    }


def job_fraction(done: int, total: int, segments: int | None, per_round: int, manifest: Path) -> float:
    """How much of a job's denoising is done after step ``done`` of ``total`` of the current pass: for a
    ``segments`` job of ``segments`` segments (one round renders ``per_round``, one per data group), the rounds
    finished before this one count too (from the segments its ``manifest.json`` lists)."""
    step = done / max(1, total)
    if not segments:
        return step
    try:
        finished = len(json.loads(manifest.read_text())["segments"])
    except (OSError, ValueError, KeyError, TypeError):
        finished = 0
    rounds = math.ceil(segments / max(1, per_round))
    return min(1.0, (finished // max(1, per_round) + step) / rounds)


def _local_folder(folder: str, files: dict[str, bytes], scratch, job_id: str) -> Path:
    """The upload as this rank sees it: the stored folder when this rank reads every file of it, else a private
    copy of them all (the speakers' JSON names its tracks relative to its folder)."""
    try:
        if all(os.path.getsize(Path(folder) / name) == len(data) for name, data in files.items()):
            return Path(folder)
    except OSError:
        pass
    copy = Path(scratch.name) / job_id
    copy.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (copy / name).write_bytes(data)
    return copy


def _quietly(call, *args, **kwargs):
    """A store update whose failure is logged, not raised (the worker goes on; the lease settles the job)."""
    try:
        return call(*args, **kwargs)
    except StoreError as err:
        log.error("job store update failed: %s", err)
        return None


def run_job(renderer, topo, store, preemption, command: dict, strategy: str, scratch, lease_seconds: float) -> bool:
    """Render one job on every rank. Returns False when it was preempted by a signal (checkpointed and queued
    again): the loop then ends."""
    try:
        return _run_job(renderer, topo, store, preemption, command, strategy, scratch, lease_seconds)
    finally:
        if not topo.is_main:  # this rank's private copies of the uploads
            shutil.rmtree(Path(scratch.name) / command["job"]["id"], ignore_errors=True)


def _run_job(renderer, topo, store, preemption, command: dict, strategy: str, scratch, lease_seconds: float) -> bool:
    spec = command["job"]
    job_id, token = spec["id"], spec["lease_token"]
    folder = Path(command["folder"])
    if not topo.is_main:
        folder = _local_folder(command["folder"], command["files"], scratch, job_id)
    job = stored_job(
        renderer.cfg,
        folder,
        command["output"],
        job_id,
        prompt=spec["prompt"],
        seed=int(spec["seed"]),
        steps=int(spec["steps"]),
        strategy=(spec.get("params") or {}).get("strategy") or strategy,
    )
    state = StateStore(command["resume"])
    stop = JobStop(preemption, job_id)
    pace: list[float] = []  # (time, fraction) at this attempt's first step: the ETA's pace
    if topo.is_main:
        note = f", resuming after step {spec['checkpoint_step']}" if spec.get("checkpoint_step") else ""
        log.info("job %s: rendering (attempt %d%s)", job_id, spec["attempts"], note)

    manifest = Path(command["output"] + ".segments") / "manifest.json"

    def on_step(done: int, total: int) -> None:
        now = time.time()
        fraction = job_fraction(done, total, spec.get("segments"), topo.data_size, manifest)
        if not pace:
            pace.extend((now, fraction))
        elapsed, gained = now - pace[0], fraction - pace[1]
        eta_at = now + elapsed / gained * (1.0 - fraction) if gained > 0 else None
        verdict = _quietly(
            store.progress, job_id, done, total, token=token, percent=int(100 * fraction), eta_at=eta_at
        )
        if verdict is not None:
            stop.hear(verdict)

    beat = Heartbeat(store, job_id, token, lease_seconds, stop) if topo.is_main else nullcontext()
    try:
        with beat:
            report = renderer.render(job, state=state, preemption=stop, on_step=on_step if topo.is_main else None)
    except Preempted as halt:
        reason = topo.broadcast_object(stop.reason if topo.is_main else None)
        if reason == "cancel":
            if topo.is_main and _quietly(store.mark_cancelled, job_id, halt.step, token=token):
                log.warning("job %s: cancelled after step %d; its files are freed", job_id, halt.step)
            return True
        if reason == "lost":
            if topo.is_main:
                log.warning("job %s: stopped after step %d; the worker that took it over continues", job_id, halt.step)
            return True
        if topo.is_main:
            _quietly(store.requeue, job_id, halt.step, token=token)
            log.warning("job %s: checkpointed after step %d; it continues on the next worker", job_id, halt.step)
        return False
    except Exception as err:  # noqa: BLE001 - a failed job is reported; the worker goes on
        if topo.is_main:
            if _quietly(store.fail, job_id, f"{type(err).__name__}: {err}", token=token):
                log.exception("job %s failed", job_id)
            else:
                log.warning("job %s: failed here (%s) but is no longer this worker's; not marked failed", job_id, err)
        return True
    if topo.is_main and (stop.reason == "cancel" or _quietly(store.cancel_requested, job_id)):
        if _quietly(store.mark_cancelled, job_id, None, token=token):  # asked for after the last step
            log.warning("job %s: cancelled as it finished; its files are freed", job_id)
    elif topo.is_main:
        if _quietly(store.succeed, job_id, report, token=token):
            shutil.rmtree(command["resume"], ignore_errors=True)
            log.info("job %s: completed (%s)", job_id, command["output"])
        else:
            log.warning("job %s: finished, but the lease was lost; the job's holder records it", job_id)
    return True
