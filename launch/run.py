"""What every entry point does after parsing: compose, validate (``avatar.validate.validate``, on every rank, before
anything is built or written), then render in the process group and tear it down. ``launch.generate``,
``launch.batch`` and ``launch.submit`` are thin wrappers around it (and do not import each other).

Exit codes: 0 done; 2 bad input (one line, before any model); 3 a write failed (disk full, quota, read-only,
permissions: one line naming the path and the cause), the output appeared meanwhile (both paths named, ours kept
under the conflict name) or another run holds the output's lock (its pid and host named; ``batch.wait_for_lock=true``
waits instead); 1 a batch row failed; 75 preempted with a checkpoint (the same command resumes); 130 Ctrl-C (with a
checkpoint after the first, at once after a second; the same command resumes).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

from avatar.compose import compose
from avatar.config import RunConfig
from avatar.io.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, WRITE_ERRNOS, InputError, OutputConflict, write_error
from avatar.validate import Validated, validate
from launch.log import setup_logging

log = logging.getLogger("launch.generate")


def prepare_jobs(cfg: RunConfig) -> Validated:
    """The one validation for this launch's world size."""
    from launch.dist import read_env

    _, world_size, _, gpus_per_node = read_env()
    return validate(cfg, world_size=world_size, gpus_per_node=gpus_per_node)


def prepare(argv: list[str] | None) -> tuple[RunConfig, Validated]:
    """Compose and validate; raises InputError (exit 2) before anything is built."""
    cfg = compose(argv)
    return cfg, prepare_jobs(cfg)


def run_from_config(cfg: RunConfig, validated: Validated) -> int:
    """Initialise the process group, take the output's lock (one owner per output: a second run refuses naming the
    holder, or waits with ``batch.wait_for_lock=true``), build the validated plan's mesh (every group comes from it)
    and render the jobs; always release the lock and tear the group down. A preemption (SIGTERM/SIGUSR1/SIGUSR2)
    saves a checkpoint and returns ``EXIT_PREEMPTED``, a Ctrl-C the same with ``EXIT_INTERRUPTED``; the same command
    resumes."""
    from avatar.io.errors import OutputBusy
    from avatar.pipeline.resume import Preempted
    from avatar.pipeline.state import StateStore, batch_state_dir, lock_for_run, single_state_dir
    from launch.dist import destroy, init_distributed, under_agent
    from launch.signals import REPEAT_WINDOW, PreemptionHandler, record_preemption, requeue_if_slurm

    env = init_distributed(cfg.device)
    setup_logging(env.rank)
    handler = PreemptionHandler(repeat_window=REPEAT_WINDOW if under_agent() else 0.0, announce=env.is_main)
    handler.install()
    lock = None
    try:
        mesh = validated.plan.build_mesh(env.device.type)
        job_topo, rows_topo = mesh.topologies(env.rank, env.device, cfg.attention)
        from avatar.memory.estimate import jobs_geometry
        from avatar.pipeline.run import Renderer

        geometry = jobs_geometry(cfg.model, validated.jobs)
        try:
            if cfg.batch.manifest:
                folder, what = batch_state_dir(cfg.output_dir), f"output_dir={cfg.output_dir}"
            else:
                folder, what = single_state_dir(validated.jobs[0].output), f"output={validated.jobs[0].output}"
            shard = (cfg.batch.shard_index, cfg.batch.shard_count) if cfg.batch.shard_count is not None else None
            lock = lock_for_run(
                job_topo, folder, what, cfg.batch.wait_for_lock, stop=lambda: handler.requested, shard=shard
            )
            if cfg.batch.manifest:
                from avatar.pipeline.batch import run_batch

                renderer = Renderer(cfg, rows_topo, geometry)
                return run_batch(cfg, validated, renderer, job_topo, rows_topo, handler)
            job = validated.jobs[0]
            state = StateStore(single_state_dir(job.output))
            if not _finished_before(cfg, job, state, job_topo):
                renderer = Renderer(cfg, job_topo, geometry)
                renderer.render(job, state=state, preemption=handler)
            if env.is_main:
                shutil.rmtree(single_state_dir(job.output), ignore_errors=True)
                if handler.requested:
                    log.warning("the stop was asked after the last denoising step: the video was finished instead")
            return 0
        except Preempted as stop:
            if env.is_main:
                how = "Ctrl-C" if handler.interrupted else "preempted"
                log.warning(
                    "stopped (%s) after step %d with a checkpoint; run the same command to resume", how, stop.step
                )
                if handler.interrupted:
                    sys.stderr.write(
                        f"interrupted after step {stop.step}: the checkpoint is saved; run the same command to "
                        "continue from it\n"
                    )
                else:
                    record_preemption()
                    requeue_if_slurm()
            return handler.exit_code
        except OutputBusy as err:
            if env.is_main:
                sys.stderr.write(f"error: {err}\n")
            return handler.exit_code if handler.requested else EXIT_WRITE_FAILED
        except InputError as err:
            # The memory pre-flight: every rank stops with the same line (before any weight was loaded).
            sys.stderr.write(f"error: {err}\n")
            return EXIT_BAD_INPUT
        except OutputConflict as err:
            if env.is_main:
                sys.stderr.write(f"error: {err}\n")
            return EXIT_WRITE_FAILED
        except OSError as err:
            err = write_error(err, getattr(err, "filename", None) or "?")
            if err.errno not in WRITE_ERRNOS:
                raise
            sys.stderr.write(f"error: {err}; this run's temporary files were removed\n")
            return EXIT_WRITE_FAILED
    finally:
        if lock is not None:
            lock.release()
        handler.uninstall()
        destroy()


def _finished_before(cfg: RunConfig, job, state, topo) -> bool:
    """The single job was complete before this run (a kill took its report or the state's removal): rank 0 writes
    the missing report from the done mark, or says why it cannot; every rank learns it (no model is built). An
    output that appeared since validation (typically written by the run whose lock this one waited for with
    ``batch.wait_for_lock=true``) raises ``OutputBusy`` on every rank, before any model."""
    from avatar.io.errors import OutputBusy
    from avatar.pipeline.state import restore_report
    from avatar.validate import batch_row_done

    outcome = None
    if topo.is_main:
        if batch_row_done(state, cfg, job):
            from avatar.pipeline.job import config_dict
            from avatar.pipeline.resume import job_state

            key, _ = job_state(config_dict(cfg), job)
            outcome = ("done", restore_report(state, key, job.output) or f"{job.output} is already complete")
        elif os.path.lexists(job.output) and not cfg.overwrite:
            outcome = (
                "taken",
                f"output={job.output} appeared after this run was validated (written by the run that held its "
                "lock, or by another process); pass overwrite=true to replace it or choose another path",
            )
    outcome = topo.broadcast_object(outcome)
    if outcome is None:
        return False
    kind, note = outcome
    if kind == "taken":
        raise OutputBusy(note)
    if topo.is_main:
        log.warning("%s; nothing to render", note)
    return True


def main(argv: list[str] | None = None, require_batch: bool = False) -> int:
    from launch.dist import peek_rank
    from launch.signals import EXIT_INTERRUPTED

    setup_logging(peek_rank())
    try:
        try:
            cfg, validated = prepare(argv)
            if require_batch and not cfg.batch.manifest:
                raise InputError("launch.batch needs batch=MANIFEST output_dir=DIR (see --help)")
        except InputError as err:
            if peek_rank() == 0:
                sys.stderr.write(f"error: {err}\n")
            return EXIT_BAD_INPUT
        return run_from_config(cfg, validated)
    except KeyboardInterrupt:
        # Ctrl-C outside the renderer's handler (validation, process-group setup): nothing was written yet.
        if peek_rank() == 0:
            sys.stderr.write("\nerror: interrupted before rendering started; nothing was written\n")
        return EXIT_INTERRUPTED
