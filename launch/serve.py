"""The server: ``torchrun --nproc_per_node=N -m launch.serve model=... weights=... serve.port=8000``.

``serve.role`` says what this launch is:

- ``both`` (default): rank 0 serves HTTP (FastAPI + uvicorn, in a thread; ``avatar/serve/app.py``) and every rank
  runs the worker loop (``avatar/serve/worker.py``), one job at a time across all of them;
- ``api``: the HTTP front end only, one process, no model and no process group (``python -m launch.serve
  serve.role=api``);
- ``worker``: a worker group only, no HTTP (``torchrun ... -m launch.worker``, the same as ``serve.role=worker``).

Any number of each share one job store (``serve.store``: SQLite on one machine, PostgreSQL across machines) and one
data folder (``serve.data_dir``: uploads, results, resume state; shared storage). Workers claim jobs under a lease
(``serve.lease_seconds``), so a worker that dies mid-job hands it to the next one, which resumes it from its last
checkpoint. The settings are checked before anything is built (bad ones: one line, exit 2): the plan for this world
size, the weights, the ``serve`` section (a non-loopback ``serve.host`` needs ``serve.api_key``), the store (opened
and migrated by rank 0), the API key (``serve.api_key``, ``serve.api_key_file`` or ``AVATAR_API_KEY``) and the address, which rank 0 binds before the models load. SIGTERM/SIGUSR1 (or Ctrl-C)
finishes or checkpoints the running job and exits (75 when a job was checkpointed and queued again).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from avatar.compose import compose, help_text, wants_help
from avatar.config import RunConfig, ServeRole
from avatar.io.errors import EXIT_BAD_INPUT, InputError
from avatar.plan import ParallelPlan
from launch.log import setup_logging

log = logging.getLogger("launch.serve")

#: The API key from the environment (when neither ``serve.api_key`` nor ``serve.api_key_file`` is given): not in
#: ``ps``, and any UTF-8 text (the command-line grammar takes no ``=``, ``,`` or ``#`` in a value).
API_KEY_ENV = "AVATAR_API_KEY"

HELP = help_text(
    "python -m launch.serve | torchrun --nproc_per_node=N -m launch.serve",
    "Load the models once and render posted jobs over HTTP (the OpenAI video API's shape: POST /v1/videos, GET\n"
    "/v1/videos/ID, /content, DELETE, /events, /report; docs/serve.md). Jobs live in serve.store (default: SQLite in\n"
    "serve.data_dir); the same command continues the queue after a stop. serve.role=api: the HTTP front end only;\n"
    "serve.role=worker (launch.worker): a worker group only; any number of each share one store (docs/workers.md).",
    [
        "python -m launch.serve model=tiny weights=weights/tiny serve.port=8000",
        "torchrun --nproc_per_node=8 -m launch.serve model=hunyuan_avatar serve.host=0.0.0.0 serve.api_key_file=key",
        "python -m launch.serve serve.role=api model=hunyuan_avatar serve.store=postgresql://avatar@db/avatar "
        "serve.data_dir=/shared/serve",
    ],
)

#: Signals that stop the server (after the running job's next step boundary).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def store_url(cfg: RunConfig) -> str:
    from avatar.serve.store import default_url

    return cfg.serve.store or default_url(cfg.serve.data_dir)


def check_store(cfg: RunConfig, world_size: int) -> None:
    """The role, lease and store settings (raises InputError)."""
    from avatar.serve.store import check_url

    serve = cfg.serve
    if serve.role == ServeRole.api and world_size > 1:
        raise InputError(
            f"serve.role=api runs no model: start it as one process (python -m launch.serve serve.role=api), "
            f"not as {world_size} ranks"
        )
    try:
        check_url(store_url(cfg))
    except ValueError as err:
        raise InputError(str(err)) from None


def open_store(cfg: RunConfig):
    """The job store of ``cfg`` (connected, migrated); InputError naming ``serve.store`` when it cannot be had."""
    from avatar.serve.store import JobStore, StoreError

    try:
        return JobStore(cfg.serve.data_dir, store_url(cfg))
    except StoreError as err:
        raise InputError(f"the job store cannot be used: {err}") from None


def prepare(argv: list[str] | None) -> tuple[RunConfig, ParallelPlan | None]:
    """Compose and check everything that needs no model, resolving the one plan (None for ``serve.role=api``);
    raises InputError."""
    from avatar.plan import resolve_plan
    from avatar.serve.app import check_serve, with_api_key
    from avatar.validate import check_config
    from avatar.validate import check_weights as validate_weights
    from launch.dist import peek_rank, read_env

    cfg = with_api_key(compose(argv), os.environ.get(API_KEY_ENV))
    check_config(cfg, host=cfg.serve.role != ServeRole.api)  # requests are checked with host=False
    _, world_size, _, gpus_per_node = read_env()
    if cfg.serve.role != ServeRole.worker:
        check_serve(cfg)
    check_store(cfg, world_size)
    plan = None
    if cfg.serve.role != ServeRole.api:
        plan = resolve_plan(cfg, world_size, gpus_per_node)
        validate_weights(cfg)
    data_dir = Path(cfg.serve.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"serve.data_dir={data_dir} cannot be created: {err.strerror or err}") from None
    if peek_rank() == 0:
        open_store(cfg).close()  # reachable, writable, migrated (a corrupt store: one line): before any model
    return cfg, plan


def redacted(cfg: RunConfig) -> RunConfig:
    """The config the renderer (and so every run report) sees: the API key and the store's password never reach a
    file. The renderer replaces a result that appeared meanwhile: only the lease holder's update counts, and two
    renders of one job give the same video."""
    from avatar.serve.store import redact

    serve = replace(
        cfg.serve,
        api_key="<set>" if cfg.serve.api_key else None,
        store=redact(cfg.serve.store) if cfg.serve.store else None,
    )
    return replace(cfg, serve=serve, overwrite=True)


def _announce(cfg: RunConfig, http) -> str:
    from avatar.io.atomic import atomic_write_json

    host, port = http.address
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    atomic_write_json(Path(cfg.serve.data_dir) / "server.json", {"url": url, "host": host, "port": port})
    return url


def run_api(cfg: RunConfig, sock) -> int:
    """``serve.role=api``: the HTTP front end over the store until a stop signal; no model, no process group."""
    from avatar.serve.app import HttpServer, create_app
    from launch.signals import PreemptionHandler

    setup_logging(0)
    handler = PreemptionHandler(STOP_SIGNALS).install()
    store = open_store(cfg)
    http = None
    try:
        http = HttpServer(create_app(cfg, store), sock).start()
        url = _announce(cfg, http)
        log.info("API front end on %s (store %s); the workers render", url, _shown(cfg))
        while not handler.requested:
            time.sleep(0.2)
        log.warning("stop requested: the API front end stops")
        return 0
    finally:
        handler.uninstall()
        if http is not None:
            http.stop()
        store.close()


def run_server(cfg: RunConfig, sock, plan: ParallelPlan) -> int:
    """``serve.role=both|worker``: initialise the process group, build the plan's mesh, load the models, (rank 0 of
    ``both``: serve HTTP,) work the queue until stopped; always tear the group down."""
    from avatar.pipeline.run import Renderer
    from avatar.serve.store import worker_name
    from avatar.serve.worker import serve_jobs
    from launch.dist import destroy, init_distributed
    from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption

    env = init_distributed(cfg.device)
    setup_logging(env.rank)
    handler = PreemptionHandler(STOP_SIGNALS).install()
    http = api_store = store = None
    ready = threading.Event()
    wake = threading.Event()
    url = None
    try:
        if env.is_main:
            store = open_store(cfg)  # the worker's own connection (the HTTP threads never hold it up)
            expired = store.requeue_expired()
            if expired:
                log.warning("jobs whose worker stopped heartbeating are queued again: %s", ", ".join(expired))
            if cfg.serve.role == ServeRole.both:
                from avatar.serve.app import HttpServer, create_app

                api_store = open_store(cfg)
                app = create_app(cfg, api_store, wake, ready.is_set, sequence_degree=plan.sequence_size)
                http = HttpServer(app, sock).start()
                url = _announce(cfg, http)
                log.info("serving on %s (loading the models; jobs are queued meanwhile)", url)
        job_topo, _ = plan.build_mesh(env.device.type).topologies(env.rank, env.device, cfg.attention)
        renderer = Renderer(redacted(cfg), job_topo)
        ready.set()
        owner = job_topo.broadcast_object(worker_name() if env.is_main else None)
        if env.is_main:
            where = f"; ready on {url}" if url else ""
            log.info(
                "worker %s (%d rank(s)) ready: store %s, lease %g s%s",
                owner,
                env.world_size,
                _shown(cfg),
                cfg.serve.lease_seconds,
                where,
            )
        outcome = serve_jobs(
            renderer, job_topo, store, handler, wake, cfg.long.strategy, cfg.serve.lease_seconds, owner=owner
        )
        if outcome.preempted:
            if env.is_main:
                record_preemption()
                log.warning("stopped with a checkpoint; the job continues on the next worker (or this command)")
            return EXIT_PREEMPTED
        return 0
    finally:
        handler.uninstall()
        if http is not None:
            http.stop()
        for opened in (api_store, store):
            if opened is not None:
                opened.close()
        destroy()


def _shown(cfg: RunConfig) -> str:
    from avatar.serve.store import redact

    return redact(store_url(cfg))


@record
def main(argv: list[str] | None = None) -> int:
    from avatar.serve.app import bind
    from launch.dist import peek_rank

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    setup_logging(peek_rank())
    try:
        cfg, plan = prepare(argv)
        wants_http = cfg.serve.role != ServeRole.worker and peek_rank() == 0
        sock = bind(cfg.serve.host, cfg.serve.port) if wants_http else None
    except InputError as err:
        if peek_rank() == 0:
            sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    if cfg.serve.role == ServeRole.api:
        return run_api(cfg, sock)
    return run_server(cfg, sock, plan)


if __name__ == "__main__":
    raise SystemExit(main())
