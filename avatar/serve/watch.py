"""One running job as the worker sees it between steps: its progress for the API, and a ``DELETE`` that stops it.

The renderer calls ``on_step(done, total)`` on the group's rank 0 after every denoising step and asks its
``preemption`` object at every step boundary whether to stop (``Resume.stop_requested``: all ranks agree with one
all-reduce). ``JobWatch`` is that object: it asks for a checkpoint-and-stop when the process got a preemption signal
(as before), and for a stop with nothing kept when rank 0 read the job's cancel flag in the store after the step
(``DELETE /v1/videos/{id}``), so a cancelled job stops after at most one more step on every rank, even inside a run
of cached steps (where no checkpoint can be taken). ``agreed_cancel`` then tells every rank whether the stop was a cancel (the job
is dropped, the server goes on) or a preemption (the job is checkpointed and queued again, the server stops).

Progress is the fraction of the denoising done: ``done / total`` steps, and for the ``segments`` strategy the rounds
before this one too (one round renders one segment per data-parallel group; the rounds finished so far are counted
from the segments listed in ``<output>.segments/manifest.json``). The ETA is the pace since the first step this
attempt saw (a resumed job does not count its checkpointed steps as work done now). Percent stays below 100 until the
video is published.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)


class JobWatch:
    """Progress and cancel of one job on one rank (only rank 0 reads and writes the store)."""

    def __init__(self, store, spec: dict, topo, preemption, output: str) -> None:
        self.store = store
        self.job_id = spec["id"]
        self.segments = spec.get("segments")
        self.topo = topo
        self.preemption = preemption
        self.manifest = Path(output + ".segments") / "manifest.json"
        self.cancelled = False
        self._looked = self.segments is not None
        self._start: tuple[float, float] | None = None

    @property
    def requested(self) -> bool:
        """A stop of either kind is wanted on this rank."""
        return self.stop_level() > 0

    def stop_level(self) -> float:
        """Read by ``Resume.stop_requested`` on every rank at every step boundary, then all-reduced (MAX): 0 go on,
        1 preempted (checkpoint at the next resumable step), 2 cancelled (stop after this step, keep nothing)."""
        if self.cancelled:
            return 2.0
        return 1.0 if self.preemption is not None and self.preemption.requested else 0.0

    def fraction(self, done: int, total: int) -> float:
        """How much of the job's denoising is done after step ``done`` of ``total`` of the current pass."""
        step = done / max(1, total)
        if not self._looked:  # claimed in the moment between its row and its segment count
            self._looked = True
            self.segments = (self.store.get(self.job_id) or {}).get("segments")
        if not self.segments:
            return step
        per_round = max(1, self.topo.data_size)
        rounds = math.ceil(self.segments / per_round)
        return min(1.0, (self._finished_segments() // per_round + step) / rounds)

    def on_step(self, done: int, total: int) -> None:
        """After every step (rank 0): record the progress, then read the cancel flag."""
        self.store.progress(self.job_id, done, total)
        now, fraction = time.time(), self.fraction(done, total)
        if self._start is None:
            self._start = (now, fraction)
        start, first = self._start
        eta = None
        if fraction > first:
            eta = round((now - start) / (fraction - first) * (1.0 - fraction), 1)
        self.store.set_progress(self.job_id, min(99, int(100 * fraction)), eta)
        if not self.cancelled and self.store.cancel_requested(self.job_id):
            self.cancelled = True
            log.warning("job %s: cancel requested; stopping after this step", self.job_id)

    def agreed_cancel(self) -> bool:
        """After the render stopped (every rank calls this): was it a cancel? Rank 0 then drops the job."""
        cancelled = bool(self.topo.broadcast_object(self.cancelled if self.topo.is_main else None))
        return cancelled

    def cancelled_at_end(self) -> bool:
        """Rank 0, after a finished render: was a cancel asked for after the last step (then the video goes too)?"""
        return self.cancelled or self.store.cancel_requested(self.job_id)

    def drop(self, step: int | None) -> None:
        """Rank 0: mark the job cancelled and free its files."""
        self.store.mark_cancelled(self.job_id, step)
        self.store.free_files(self.job_id)
        log.info("job %s: cancelled%s; its files are removed", self.job_id, f" after step {step}" if step else "")

    def _finished_segments(self) -> int:
        try:
            return len(json.loads(self.manifest.read_text())["segments"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
