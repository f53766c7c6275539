"""The HTTP side of the server (rank 0): a FastAPI app over the ``JobStore``, and the uvicorn thread that serves it.

    POST /v1/videos               multipart: image, audio (files); prompt, seed, steps (optional) → 202 {"id": ...}
    GET  /v1/videos               the latest jobs
    GET  /v1/videos/{id}          status (queued|running|succeeded|failed), progress (step, total, ETA), error
    GET  /v1/videos/{id}/content  the mp4 (409 until it has succeeded)
    GET  /healthz                 liveness and readiness (models loaded), queue length
    GET  /                        the web page (upload, progress, playback)

Uploads are checked with the command line's own validation (``avatar.validate.check_job``: the same one-line
messages, with the client's file name in place of the stored path) before the job is queued: 400 for bad input,
413 for an upload over ``serve.max_image_mb`` / ``serve.max_audio_mb`` (or a body over their sum), 411 without a
length, 429 when ``serve.max_queue`` jobs are already waiting. Files are stored under names the server chooses;
a client's file name is only ever shown back as text. With ``serve.api_key`` every ``/v1`` request needs
``Authorization: Bearer <key>`` (else 401); the page and ``/healthz`` stay open.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import shutil
import socket
import threading
import unicodedata
from dataclasses import replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from avatar.config import RunConfig
from avatar.io.errors import InputError
from avatar.serve.store import JobStore, new_id

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Room for the text fields and the multipart framing on top of the two files.
BODY_SLACK = MIB
MAX_PROMPT_CHARS = 4000
FIELDS = ("image", "audio", "prompt", "seed", "steps")


class HTTPProblem(Exception):
    """A request the server refuses: status code and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- accepting a job ------------------------------------------------------------------------------------------------


def display_name(name: str | None, fallback: str) -> str:
    """A client's file name made safe to show (base name, printable, at most 100 characters)."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] not in "CZ" or ch == " ").strip()
    return base[:100] or fallback


def _int_field(name: str, value, default: int) -> int:
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise HTTPProblem(400, f"{name}={str(value)[:40]!r} is invalid; give an integer") from None


def accept_job(cfg: RunConfig, store: JobStore, form, sequence_degree: int = 1) -> str:
    """Validate one ``POST /v1/videos`` form (a starlette ``FormData``), store its files and queue the job.
    ``sequence_degree``: the plan's ring·ulysses (the xfuser backend's token rule). Returns the job id; raises
    ``HTTPProblem``."""
    from avatar.validate import check_job as validate_job

    serve = cfg.serve
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise HTTPProblem(400, f"unknown field(s) {', '.join(unknown)}; send {', '.join(FIELDS)}")
    files = {}
    for field in ("image", "audio"):
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise HTTPProblem(400, f"missing {field}: send multipart file fields image=<portrait> and audio=<speech>")
        files[field] = upload
    prompt = form.get("prompt")
    prompt = cfg.prompt if prompt is None or str(prompt).strip() == "" else str(prompt)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise HTTPProblem(400, f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    seed = _int_field("seed", form.get("seed"), cfg.seed)
    steps = _int_field("steps", form.get("steps"), cfg.sampling.steps)
    caps = {"image": (serve.max_image_mb, "serve.max_image_mb"), "audio": (serve.max_audio_mb, "serve.max_audio_mb")}
    names = {field: display_name(upload.filename, field) for field, upload in files.items()}
    for field, upload in files.items():
        limit, key = caps[field]
        if upload.size is not None and upload.size > limit * MIB:
            raise HTTPProblem(
                413, f"{field}={names[field]} is {upload.size / MIB:.1f} MiB; at most {limit:g} MiB ({key})"
            )
    if store.count_active() >= serve.max_queue:
        raise HTTPProblem(429, f"the queue is full ({serve.max_queue} jobs, serve.max_queue); try again later")

    job_id = new_id()
    staging = store.staging_dir(job_id)
    staging.mkdir(parents=True)
    try:
        for field, upload in files.items():
            upload.file.seek(0)
            with open(staging / field, "wb") as out:
                shutil.copyfileobj(upload.file, out, MIB)
        check = functools.partial(validate_job, sequence_degree=sequence_degree)
        _validate_files(cfg, staging, names, steps, job_id, store, check)
        target = store.upload_dir(job_id)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not store.add(
        job_id,
        prompt=prompt,
        seed=seed,
        steps=steps,
        image_name=names["image"],
        audio_name=names["audio"],
        max_active=serve.max_queue,
    ):
        shutil.rmtree(target, ignore_errors=True)
        raise HTTPProblem(429, f"the queue is full ({serve.max_queue} jobs, serve.max_queue); try again later")
    log.info("queued %s (image %s, audio %s, seed %d, %d steps)", job_id, names["image"], names["audio"], seed, steps)
    return job_id


def audio_limit(cfg: RunConfig) -> float:
    """Longest audio the server accepts: ``serve.max_audio_seconds``, or ``audio.max_seconds`` when smaller."""
    limits = [cfg.serve.max_audio_seconds] + ([cfg.audio.max_seconds] if cfg.audio.max_seconds else [])
    return min(limits)


def _validate_files(cfg: RunConfig, folder: Path, names: dict, steps: int, job_id: str, store, validate_job) -> None:
    """The command line's checks on the stored files, then the server's image-size cap."""
    from PIL import Image

    from avatar.pipeline.job import Job

    capped = replace(cfg, audio=replace(cfg.audio, max_seconds=audio_limit(cfg)))
    job = Job(
        image=str(folder / "image"),
        audio=str(folder / "audio"),
        prompt="",
        output=str(store.result_path(job_id)),
        seed=0,
        steps=steps,
    )
    try:  # the size from the header, before anything is decoded (an unreadable file is validate_job's to name)
        with Image.open(job.image) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001
        width = height = 0
    if max(width, height) > cfg.serve.max_image_side:
        raise HTTPProblem(
            400,
            f"image={names['image']} is {width}x{height}; at most {cfg.serve.max_image_side} px a side "
            "(serve.max_image_side)",
        )
    try:
        validate_job(capped, job, {"image": job.image, "audio": job.audio}, overwrite=False)
    except InputError as err:
        message = str(err).replace(job.image, names["image"]).replace(job.audio, names["audio"])
        if cfg.audio.max_seconds is None or cfg.serve.max_audio_seconds < cfg.audio.max_seconds:
            message = message.replace("audio.max_seconds", "serve.max_audio_seconds")
        raise HTTPProblem(400, message) from None


# --- the app --------------------------------------------------------------------------------------------------------


def job_view(store: JobStore, job: dict) -> dict:
    """What ``GET /v1/videos/{id}`` answers."""
    out = {
        "id": job["id"],
        "status": job["status"],
        "created_at": job["created"],
        "started_at": job["started"],
        "finished_at": job["finished"],
        "prompt": job["prompt"],
        "seed": job["seed"],
        "steps": job["steps"],
        "image": job["image_name"],
        "audio": job["audio_name"],
        "progress": {"step": job["step"], "total": job["total"], "eta_seconds": job["eta_seconds"]},
        "queue_position": store.position(job["id"]) if job["status"] == "queued" else None,
        "checkpoint_step": job["checkpoint_step"],
        "resumed_from_step": job["resumed_from_step"],
        "error": job["error"],
        "result": job["report"],
    }
    if job["status"] == "succeeded":
        out["content_url"] = f"/v1/videos/{job['id']}/content"
    return out


def create_app(
    cfg: RunConfig, store: JobStore, wake: threading.Event | None = None, ready=lambda: True, sequence_degree: int = 1
):
    """The FastAPI app. ``wake`` is set whenever a job is queued (the worker loop waits on it); ``ready()`` says
    whether the models are loaded; ``sequence_degree`` is the plan's ring·ulysses (uploads are checked against it)."""
    serve = cfg.serve
    max_body = int((serve.max_image_mb + serve.max_audio_mb) * MIB) + BODY_SLACK
    page = resources.files("avatar.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="avatar-launcher", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")

    def problem(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if serve.api_key:
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), serve.api_key.encode()
                ):
                    return problem(
                        401,
                        "missing or wrong API key: send the header Authorization: Bearer <serve.api_key>",
                        {"WWW-Authenticate": "Bearer"},
                    )
            if request.method == "POST":
                length = request.headers.get("content-length")
                if length is None:
                    return problem(411, "send a Content-Length (chunked uploads are not accepted)")
                if not length.isdigit() or int(length) > max_body:
                    return problem(
                        413,
                        f"request body of {length} bytes is over the limit of {max_body} bytes "
                        "(serve.max_image_mb + serve.max_audio_mb)",
                    )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "ready": bool(ready()), "active_jobs": store.count_active()}

    @app.post("/v1/videos", status_code=202)
    async def create(request: Request):
        try:
            form = await request.form(max_files=2, max_fields=len(FIELDS))
        except Exception as err:  # noqa: BLE001 - a malformed body is the client's problem
            return problem(400, f"could not read the multipart form ({' '.join(str(err).split())})")
        try:
            job_id = await run_in_threadpool(accept_job, cfg, store, form, sequence_degree)
        except HTTPProblem as err:
            return problem(err.status, err.message)
        finally:
            await form.close()
        if wake is not None:
            wake.set()
        return JSONResponse(
            {"id": job_id, "status": "queued"}, status_code=202, headers={"Location": f"/v1/videos/{job_id}"}
        )

    @app.get("/v1/videos")
    def list_jobs():
        return {"data": [job_view(store, job) for job in store.list()]}

    @app.get("/v1/videos/{job_id}")
    def status(job_id: str):
        job = store.get(job_id)
        if job is None:
            return problem(404, f"no job {job_id[:40]!r}")
        return job_view(store, job)

    @app.get("/v1/videos/{job_id}/content")
    def content(job_id: str):
        job = store.get(job_id)
        if job is None:
            return problem(404, f"no job {job_id[:40]!r}")
        if job["status"] != "succeeded":
            return problem(409, f"job {job_id} is {job['status']}; its video is ready once it has succeeded")
        path = store.result_path(job_id)
        if not path.is_file():
            return problem(410, f"the video of job {job_id} is no longer on the server")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    return app


# --- serving it -----------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_serve(cfg: RunConfig) -> None:
    """The server's own rules, before anything is built (raises InputError); the ranges of ``serve.*`` (port,
    queue and upload limits) are their declared domains, checked with every field by ``avatar.validate.check_config``
    first."""
    serve = cfg.serve
    if not is_loopback(serve.host) and not serve.api_key:
        raise InputError(
            f"serve.host={serve.host} is not a loopback address: set serve.api_key=<secret> so that only callers "
            "with the key can use the server (or bind serve.host=127.0.0.1)"
        )
    if serve.api_key is not None and not serve.api_key.strip():
        raise InputError("serve.api_key is empty; give a secret or leave it unset")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (raises InputError naming the address when it cannot be had)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise InputError(
            f"serve.host={host} serve.port={port}: cannot listen ({err.strerror or err}); choose another port"
        ) from None
    sock.set_inheritable(False)
    return sock


class HttpServer:
    """uvicorn on a socket of ours, in a background thread (signals stay with the main thread)."""

    def __init__(self, app, sock: socket.socket) -> None:
        import uvicorn

        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> HttpServer:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
