"""The server: ``torchrun --nproc_per_node=N -m launch.serve model=... weights=... serve.port=8000``.

Every rank composes the same config and loads the models once; rank 0 serves HTTP (FastAPI + uvicorn, in a thread;
``avatar/serve/app.py``) and keeps the jobs in a SQLite store under ``serve.state_dir``; all ranks run the worker
loop (``avatar/serve/worker.py``), one job at a time across all of them, through the same ``Renderer`` as the
command line. The settings are checked before anything is built (bad ones: one line, exit 2): the plan for this
world size, the weights, the ``serve`` section (a non-loopback ``serve.host`` needs ``serve.api_key``) and the
address, which rank 0 binds before the models load. SIGTERM/SIGUSR1 (or Ctrl-C) finishes or checkpoints the
running job and exits (75 when a job was checkpointed); the same command continues the queue.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from avatar.compose import compose
from avatar.config import RunConfig
from avatar.io.errors import EXIT_BAD_INPUT, InputError
from avatar.plan import ParallelPlan
from launch.log import setup_logging

log = logging.getLogger("launch.serve")

#: Signals that stop the server (after the running job's next step boundary).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def prepare(argv: list[str] | None) -> tuple[RunConfig, ParallelPlan]:
    """Compose and check everything that needs no model, resolving the one plan; raises InputError."""
    from avatar.plan import resolve_plan
    from avatar.serve.app import check_serve
    from avatar.validate import check_config
    from avatar.validate import check_weights as validate_weights
    from launch.dist import read_env

    cfg = compose(argv)
    check_config(cfg)
    check_serve(cfg)
    _, world_size, _, gpus_per_node = read_env()
    plan = resolve_plan(cfg, world_size, gpus_per_node)
    validate_weights(cfg)
    state_dir = Path(cfg.serve.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"serve.state_dir={state_dir} cannot be created: {err.strerror or err}") from None
    return cfg, plan


def redacted(cfg: RunConfig) -> RunConfig:
    """The config the renderer (and so every run report) sees: the API key never reaches a file."""
    return replace(cfg, serve=replace(cfg.serve, api_key="<set>" if cfg.serve.api_key else None))


def run_server(cfg: RunConfig, sock, plan: ParallelPlan) -> int:
    """Initialise the process group, build the plan's mesh, load the models, serve until stopped; always tear the
    group down."""
    from avatar.io.atomic import atomic_write_json
    from avatar.pipeline.run import Renderer
    from avatar.serve.worker import serve_jobs
    from launch.dist import destroy, init_distributed
    from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption

    env = init_distributed(cfg.device)
    setup_logging(env.rank)
    handler = PreemptionHandler(STOP_SIGNALS).install()
    http = store = None
    ready = threading.Event()
    wake = threading.Event()
    try:
        if env.is_main:
            from avatar.serve.app import HttpServer, create_app
            from avatar.serve.store import JobStore

            store = JobStore(cfg.serve.state_dir)
            requeued = store.recover()
            if requeued:
                log.warning("jobs left running by the last server are queued again: %s", ", ".join(requeued))
            app = create_app(cfg, store, wake, ready.is_set, sequence_degree=plan.sequence_size)
            http = HttpServer(app, sock).start()
            host, port = http.address
            url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
            atomic_write_json(Path(cfg.serve.state_dir) / "server.json", {"url": url, "host": host, "port": port})
            log.info("serving on %s (loading the models; jobs are queued meanwhile)", url)
        job_topo, _ = plan.build_mesh(env.device.type).topologies(env.rank, env.device, cfg.attention)
        renderer = Renderer(redacted(cfg), job_topo)
        ready.set()
        if env.is_main:
            log.info("models loaded; ready on %s", url)
        outcome = serve_jobs(renderer, job_topo, store, handler, wake, cfg.long.strategy)
        if outcome.preempted:
            if env.is_main:
                record_preemption()
                log.warning("stopped with a checkpoint; start the same command to continue the queue")
            return EXIT_PREEMPTED
        return 0
    finally:
        handler.uninstall()
        if http is not None:
            http.stop()
        if store is not None:
            store.close()
        destroy()


@record
def main(argv: list[str] | None = None) -> int:
    from avatar.serve.app import bind
    from launch.dist import peek_rank

    setup_logging(peek_rank())
    try:
        cfg, plan = prepare(argv)
        sock = bind(cfg.serve.host, cfg.serve.port) if peek_rank() == 0 else None
    except InputError as err:
        if peek_rank() == 0:
            sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    return run_server(cfg, sock, plan)


if __name__ == "__main__":
    raise SystemExit(main())
