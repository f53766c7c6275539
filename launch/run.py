"""What every entry point does after parsing: compose, validate (``avatar.validate.validate``, on every rank, before
anything is built or written), then render in the process group and tear it down. ``launch.generate``,
``launch.batch`` and ``launch.submit`` are thin wrappers around it (and do not import each other).

Exit codes: 0 done; 2 bad input (one line, before any model); 3 a write failed (disk full, quota, read-only,
permissions: one line naming the path and the cause) or the output appeared meanwhile (both paths named, ours kept
under the conflict name); 1 a batch row failed; 75 preempted with a checkpoint (the same command resumes).
"""

from __future__ import annotations

import logging
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
    """Initialise the process group, build the validated plan's mesh (every group comes from it) and render the
    jobs; always tear the group down. A preemption (SIGTERM/SIGUSR1/SIGUSR2) saves a checkpoint and returns
    ``EXIT_PREEMPTED``; the same command resumes."""
    from avatar.pipeline.resume import Preempted
    from avatar.pipeline.state import StateStore, single_state_dir
    from launch.dist import destroy, init_distributed
    from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption, requeue_if_slurm

    env = init_distributed(cfg.device)
    setup_logging(env.rank)
    handler = PreemptionHandler().install()
    try:
        mesh = validated.plan.build_mesh(env.device.type)
        job_topo, rows_topo = mesh.topologies(env.rank, env.device, cfg.attention)
        from avatar.memory.estimate import jobs_geometry
        from avatar.pipeline.run import Renderer

        geometry = jobs_geometry(cfg.model, validated.jobs)
        try:
            if cfg.batch.manifest:
                from avatar.pipeline.batch import run_batch

                renderer = Renderer(cfg, rows_topo, geometry)
                return run_batch(cfg, validated, renderer, job_topo, rows_topo, handler)
            renderer = Renderer(cfg, job_topo, geometry)
            job = validated.jobs[0]
            state = StateStore(single_state_dir(job.output))
            renderer.render(job, state=state, preemption=handler)
            if env.is_main:
                shutil.rmtree(single_state_dir(job.output), ignore_errors=True)
            return 0
        except Preempted as stop:
            if env.is_main:
                log.warning("stopped after step %d with a checkpoint; run the same command to resume", stop.step)
                record_preemption()
                requeue_if_slurm()
            return EXIT_PREEMPTED
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
        handler.uninstall()
        destroy()


def main(argv: list[str] | None = None, require_batch: bool = False) -> int:
    from launch.dist import peek_rank

    setup_logging(peek_rank())
    try:
        cfg, validated = prepare(argv)
        if require_batch and not cfg.batch.manifest:
            raise InputError("launch.batch needs batch=MANIFEST output_dir=DIR (see --help)")
    except InputError as err:
        if peek_rank() == 0:
            sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    return run_from_config(cfg, validated)
