"""Preemption: SIGTERM/SIGUSR1/SIGUSR2 → checkpoint at the next step boundary → exit with ``EXIT_PREEMPTED``.
Ctrl-C (SIGINT) does the same and exits with ``EXIT_INTERRUPTED`` (130, the shell's code for SIGINT) and one line
saying how to continue; a second Ctrl-C stops at once (``os._exit``, no traceback, no new checkpoint: the last one
and the temporaries are dealt with by the next run). Under torchrun the agent forwards the terminal's Ctrl-C to its
workers, which got it themselves too, so there a repeat within ``REPEAT_WINDOW`` seconds counts as the same one.

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
import time
from typing import Optional

log = logging.getLogger(__name__)

#: Exit code after a preemption checkpoint: EX_TEMPFAIL from sysexits.h ("try again later"). The sbatch templates
#: requeue on it.
EXIT_PREEMPTED = 75

#: Signals that request a checkpoint-and-exit: SIGTERM (preemption with a grace time, scancel), SIGUSR1 (the
#: templates' ``--signal=B:USR1@120``) and SIGUSR2 (submitit's preemption/timeout signal, ``launch.submit`` jobs).
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

#: Exit code after a Ctrl-C (SIGINT) checkpoint, and after a second Ctrl-C: 128 + SIGINT, as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: Seconds within which a repeated SIGINT is the same Ctrl-C forwarded by torchrun (``repeat_window``).
REPEAT_WINDOW = 1.0

#: Printed at the first Ctrl-C (by the rank that announces) and at the second.
FIRST_INTERRUPT = (
    "\nCtrl-C: finishing the current step, then saving a checkpoint (press Ctrl-C again to stop at once)\n"
)
SECOND_INTERRUPT = (
    "\nerror: interrupted again: stopped at once without a new checkpoint; run the same command to continue from the "
    "last saved one\n"
)


class PreemptionHandler:
    """Install on every rank (main thread) before rendering; ``uninstall`` (or leave the ``with`` block) after.

    ``repeat_window``: a SIGINT that follows the first within that many seconds counts as the same one (torchrun's
    forward); any later one exits at once. ``announce``: write ``FIRST_INTERRUPT`` to stderr at the first Ctrl-C
    (rank 0 only, so N ranks do not print N lines)."""

    def __init__(
        self, signals: tuple[int, ...] = PREEMPT_SIGNALS + (signal.SIGINT,), repeat_window=0.0, announce=True
    ):
        self.signals = signals
        self.received: Optional[int] = None
        self.repeat_window = float(repeat_window)
        self.announce = announce
        self._first_interrupt: Optional[float] = None
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
        # Only record (and one raw write to stderr): no logging, collectives or exceptions inside a signal handler.
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is not None:
                if now - self._first_interrupt < self.repeat_window:
                    return
                os.write(2, SECOND_INTERRUPT.encode())
                os._exit(EXIT_INTERRUPTED)
            self._first_interrupt = now
            if self.announce:
                os.write(2, FIRST_INTERRUPT.encode())
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    @property
    def requested(self) -> bool:
        """This rank received a preemption signal or a Ctrl-C."""
        return self.received is not None

    @property
    def interrupted(self) -> bool:
        """The stop was asked by Ctrl-C (exit ``EXIT_INTERRUPTED``, no requeue), not by a preemption signal."""
        return self._first_interrupt is not None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else EXIT_PREEMPTED


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
