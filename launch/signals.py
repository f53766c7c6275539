"""Preemption: SIGTERM/SIGUSR1/SIGUSR2 → checkpoint at the next step boundary → exit with ``EXIT_PREEMPTED``.

The handler only sets a flag. The pipeline asks ``Resume.stop_requested()`` (``avatar/pipeline/resume.py``) at each
step boundary; under a process group the flag is all-reduced (MAX) so every rank sees the same answer at the same
step, saves, and exits together.

Slurm: ``scancel --signal=...`` and ``#SBATCH --signal=B:USR1@120`` reach the batch shell only; the templates in
``launch/slurm/`` trap them, forward SIGTERM to the ``srun`` step (srun passes it to torchrun, torchrun to the
workers), and requeue the job themselves when it ends preempted. Outside those templates (``sbatch`` scripts of your
own, ``salloc``), rank 0 calls ``requeue_if_slurm()`` after the checkpoint. Under the templates, rank 0 calls
``record_preemption()`` instead, because torchrun does not pass exit code 75 through. Set ``AVATAR_SLURM_REQUEUE=0`` to
forbid that (the templates do, to requeue once, from the batch shell).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Optional

log = logging.getLogger(__name__)

#: Exit code after a preemption checkpoint: EX_TEMPFAIL from sysexits.h ("try again later"). The sbatch templates
#: requeue on it.
EXIT_PREEMPTED = 75

#: Signals that request a checkpoint-and-exit: SIGTERM (preemption with a grace time, scancel), SIGUSR1 (the
#: templates' ``--signal=B:USR1@120``) and SIGUSR2 (submitit's preemption/timeout signal, ``launch.submit`` jobs).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionHandler:
    """Install on every rank (main thread) before rendering; ``uninstall`` (or leave the ``with`` block) after."""

    def __init__(self, signals: tuple[int, ...] = PREEMPT_SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._stopped = False
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        # Only record: no logging, IO or collectives inside a signal handler.
        self.received = signum

    @property
    def requested(self) -> bool:
        """This rank received a preemption signal."""
        return self.received is not None


def record_preemption() -> None:
    """Touch the file named by ``AVATAR_PREEMPT_MARKER`` (set by the sbatch templates on a shared folder) after the
    checkpoint. torchrun turns a worker's exit code 75 into its own exit code 1, so the batch shell looks for this file
    to tell a preemption from a failure. Call on rank 0 (any rank is harmless)."""
    marker = os.environ.get("AVATAR_PREEMPT_MARKER")
    if not marker:
        return
    try:
        with open(marker, "a"):
            pass
    except OSError as err:
        log.warning("could not write the preemption marker %s: %s", marker, err)


def requeue_if_slurm() -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` when running in a Slurm job and ``AVATAR_SLURM_REQUEUE`` is not ``0``.
    Returns whether the requeue was accepted; failures are logged, never raised (the checkpoint is already safe)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    if os.environ.get("AVATAR_SLURM_REQUEUE", "1") == "0":
        log.info("not requeueing Slurm job %s: AVATAR_SLURM_REQUEUE=0 (the batch script requeues)", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("scontrol requeue %s failed: %s", job_id, err)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
        return False
    log.info("requeued Slurm job %s", job_id)
    return True
