"""Entry point: ``python -m launch.generate [overrides]``, ``torchrun ... -m launch.generate``, ``avatar-generate``.

One plain process needs no process group; under torchrun every rank composes the same config, validates the same
inputs, and builds the same plan. Bad input ends here with a one-line error and exit code 2, before any model is
built.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from avatar.config import RunConfig
from avatar.io.errors import EXIT_BAD_INPUT, InputError
from launch.config import compose
from launch.log import setup_logging

log = logging.getLogger("launch.generate")


def single_job(cfg: RunConfig):
    from avatar.pipeline.run import Job

    missing = [name for name, value in (("image", cfg.image), ("audio", cfg.audio.path)) if not value]
    if missing:
        raise InputError(
            f"missing {' and '.join(missing)}: give image=PATH audio=PATH (or batch=MANIFEST output_dir=DIR)"
        )
    return Job(
        image=cfg.image,
        audio=cfg.audio.path,
        prompt=cfg.prompt,
        output=cfg.output.path,
        seed=cfg.seed,
        steps=cfg.sampling.steps,
        strategy=cfg.long.strategy,
        videoid=Path(cfg.output.path).stem,
    )


def validate_job(cfg: RunConfig, job, overwrite: bool | None = None) -> None:
    """Everything about one job that can be checked without a model."""
    from avatar.io.audio import load_audio
    from avatar.io.image import load_image
    from avatar.io.validate import check_output_path, check_steps

    check_steps(job.steps)
    load_image(job.image)
    load_audio(job.audio, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds)
    check_output_path(job.output, cfg.overwrite if overwrite is None else overwrite)


def validate_weights(cfg: RunConfig) -> None:
    from avatar.weights.verify import verify_weights

    problems = verify_weights(cfg.weights, cfg.model, fp8=cfg.fp8, load_key=cfg.load_key)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; … {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InputError(
            f"weights={cfg.weights} does not match model={cfg.model.name} ({len(problems)} problems: {shown}); "
            f"run `python -m launch.weights verify {cfg.weights} model={cfg.model.name}` for the full report"
        )


def prepare_jobs(cfg: RunConfig):
    """Validate a composed config: the plan for this launch's world size, the jobs and the weights. Raises
    InputError (exit 2) before anything is built. Returns the single job's list or the batch."""
    from launch.dist import read_env
    from launch.topology import resolve_plan

    resolve_plan(cfg, read_env()[1])
    if cfg.batch.manifest:
        from launch.batch import prepare_batch

        jobs = prepare_batch(cfg)
    else:
        job = single_job(cfg)
        validate_job(cfg, job)
        jobs = [job]
    validate_weights(cfg)
    return jobs


def prepare(argv: list[str] | None) -> tuple[RunConfig, object]:
    """Compose and validate; raises InputError (exit 2) before anything is built."""
    cfg = compose(argv)
    return cfg, prepare_jobs(cfg)


def run_from_config(cfg: RunConfig, jobs) -> int:
    """Initialise the process group, build the plan and render the jobs; always tear the group down. A preemption
    (SIGTERM/SIGUSR1/SIGUSR2) saves a checkpoint and returns ``EXIT_PREEMPTED``; the same command resumes."""
    from avatar.pipeline.resume import Preempted
    from avatar.pipeline.state import StateStore, single_state_dir
    from launch.dist import destroy, init_distributed
    from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption, requeue_if_slurm

    env = init_distributed(cfg.device)
    setup_logging(env.rank)
    handler = PreemptionHandler().install()
    try:
        from launch.topology import build_topology

        job_topo, rows_topo = build_topology(cfg, env)
        from avatar.pipeline.run import Renderer

        try:
            if cfg.batch.manifest:
                from launch.batch import run_batch

                renderer = Renderer(cfg, rows_topo)
                return run_batch(cfg, jobs, renderer, job_topo, rows_topo, handler)
            renderer = Renderer(cfg, job_topo)
            job = jobs[0]
            state = StateStore(single_state_dir(job.output))
            renderer.render(job, state=state, preemption=handler)
            if env.is_main:
                import shutil

                shutil.rmtree(single_state_dir(job.output), ignore_errors=True)
            return 0
        except Preempted as stop:
            if env.is_main:
                log.warning("stopped after step %d with a checkpoint; run the same command to resume", stop.step)
                record_preemption()
                requeue_if_slurm()
            return EXIT_PREEMPTED
    finally:
        handler.uninstall()
        destroy()


@record
def main(argv: list[str] | None = None) -> int:
    from launch.dist import peek_rank

    setup_logging(peek_rank())
    try:
        cfg, jobs = prepare(argv)
    except InputError as err:
        if peek_rank() == 0:
            sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    return run_from_config(cfg, jobs)


if __name__ == "__main__":
    raise SystemExit(main())
