"""The HTTP side of the server: a FastAPI app over the ``JobStore``, and the uvicorn thread that serves it.

The video API has the shape of OpenAI's, SGLang-Diffusion's and NVIDIA Dynamo's (``POST``, poll, ``/content``)::

    POST   /v1/videos                    multipart: image, audio (files); prompt, seed, steps, model (optional);
                                         several speakers: one ``speakers`` field per speaker (JSON) and one
                                         ``audio`` file per speaker in the same order (or one shared recording)
                                         → 202 {"id": ..., "status": "queued", ...}
    GET    /v1/videos                    the jobs, newest first: ?limit=1-100 (20), ?after=<id>, ?order=desc|asc
                                         → {"object": "list", "data": [...], "first_id", "last_id", "has_more"}
    GET    /v1/videos/{id}               the job: status queued|in_progress|completed|failed|cancelled, progress
                                         0-100, step, total_steps, eta_seconds, segments, error, result
    GET    /v1/videos/{id}/content       the mp4 (409 until completed)
    GET    /v1/videos/{id}/report        the full run report (409 until completed)
    GET    /v1/videos/{id}/events        Server-Sent Events: ``progress`` (the job) on every change, ``segment``
                                         for each finished segment, then ``done`` (the job) and the end
    GET    /v1/videos/{id}/segments      the finished segments of a ``segments``-strategy job
    GET    /v1/videos/{id}/segments/{k}  segment k (0-based) as a playable mp4, while the rest renders
    DELETE /v1/videos/{id}               queued: cancelled at once; in progress: stops after the next step (202);
                                         finished: forgotten. Every file of the job is removed.
    GET    /healthz                      liveness and readiness (models loaded), queue length
    GET    /                             the web page (upload, progress, segments as they arrive, playback)

Every posted field goes through the command line's own validation before anything is stored: the request's seed,
steps and prompt in a copy of the server's config through ``check_config``, then the uploaded files through
``check_job`` (the same one-line messages, with the client's file name in place of the stored path). 400 for bad
input (also steps over ``serve.max_steps``), 413 for an upload over ``serve.max_image_mb`` / ``serve.max_audio_mb``
(or a body over their sum), 411 without a length, 429 when ``serve.max_queue`` jobs are already waiting. Files are
stored under names the server chooses; a client's file name is only ever shown back as text. An upload is written
to ``uploads/.incoming-<host>-<pid>-<id>`` and removed on every failure; the ones a killed server left are removed
when the next one starts. A fault of the storage (disk full, read-only, a corrupt store) is one log line and a 503
with a JSON error. With ``serve.api_key`` (or ``serve.api_key_file``, or ``AVATAR_API_KEY``: any UTF-8 text) every
``/v1`` request needs ``Authorization: Bearer <key>`` (else 401); the page and ``/healthz`` stay open.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import threading
import time
import unicodedata
from dataclasses import replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from avatar.config import RunConfig
from avatar.io.errors import InputError
from avatar.serve.store import JobStore, new_id
from avatar.serve.upload import SPEAKERS_FILE, stored_job, track_file

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Room for the text fields and the multipart framing on top of the two files.
BODY_SLACK = MIB
MAX_PROMPT_CHARS = 4000
FIELDS = ("image", "audio", "speakers", "prompt", "seed", "steps", "model")
#: The most speakers (``speakers`` fields, and so ``audio`` files) one request may have.
MAX_SPEAKERS = 8
#: The API's names of the store's statuses (the store keeps the API's own words since its migrations; older
#: spellings are mapped for safety).
API_STATUS = {"running": "in_progress", "succeeded": "completed"}
FINISHED = ("completed", "failed", "cancelled")
#: How often an event stream looks at the job, and how often it sends a keep-alive comment.
EVENT_POLL_SECONDS, EVENT_KEEPALIVE_SECONDS = 0.25, 15.0
#: Upload staging folders of other hosts older than this are stale too (an upload is staged for seconds).
STALE_UPLOAD_SECONDS = 3600
_INTEGER = re.compile(r"^[+-]?[0-9]{1,40}$")
_SEGMENT_FILE = re.compile(r"^segment_[0-9]{4,}\.mp4$")
_STAGING = re.compile(r"^\.incoming-(?:(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)-)?vid_[0-9a-f]{24}$")


class HTTPProblem(Exception):
    """A request the server refuses: status code and one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --- storage faults -------------------------------------------------------------------------------------------------


def storage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the job store or the data folder failed (not the request): a 503."""
    errors: list[type[BaseException]] = [sqlite3.Error, OSError]
    try:  # the PostgreSQL store's driver, where installed
        import psycopg

        errors.append(psycopg.Error)
    except ImportError:
        pass
    return tuple(errors)


def describe_fault(err: BaseException) -> str:
    """One line naming a storage fault."""
    if isinstance(err, OSError) and err.errno is not None:
        where = f" ({err.filename})" if err.filename else ""
        return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or err}{where}"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


# --- accepting a job ------------------------------------------------------------------------------------------------


def display_name(name: str | None, fallback: str) -> str:
    """A client's file name made safe to show (base name, printable, at most 100 characters)."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] not in "CZ" or ch == " ").strip()
    return base[:100] or fallback


def _int_field(name: str, value, default: int) -> int:
    if value is None or str(value).strip() == "":
        return default
    text = str(value).strip()
    if not _INTEGER.match(text):
        raise HTTPProblem(400, f"{name}={text[:40]!r} is invalid; give an integer")
    return int(text)


def request_config(cfg: RunConfig, form) -> RunConfig:
    """The server's config with the request's prompt, seed and steps, checked by the command line's
    ``check_config`` (seed 0 to 2**63 - 2, steps ≥ 1) and by ``serve.max_steps``; raises ``HTTPProblem``."""
    from avatar.validate import check_config

    model = form.get("model")
    if model is not None and str(model).strip() not in ("", cfg.model.name):
        raise HTTPProblem(400, f"model={str(model)[:40]!r} is not served here; this server renders {cfg.model.name}")
    prompt = form.get("prompt")
    prompt = cfg.prompt if prompt is None or str(prompt).strip() == "" else str(prompt)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise HTTPProblem(400, f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    seed = _int_field("seed", form.get("seed"), cfg.seed)
    steps = _int_field("steps", form.get("steps"), cfg.sampling.steps)
    ours = replace(cfg, prompt=prompt, seed=seed, sampling=replace(cfg.sampling, steps=steps))
    try:
        check_config(ours, host=False)
    except InputError as err:
        raise HTTPProblem(400, str(err).replace("sampling.steps=", "steps=")) from None
    if steps > cfg.serve.max_steps:
        raise HTTPProblem(400, f"steps={steps} is over this server's limit of {cfg.serve.max_steps} (serve.max_steps)")
    return ours


def staging_dir(store: JobStore, job_id: str) -> Path:
    """Where an upload is written and validated before the job exists: named after this host and process, so the
    next server on this host knows a dead one's leftovers."""
    from avatar.io.atomic import HOST

    return store.upload_dir(job_id).parent / f".incoming-{HOST}-{os.getpid()}-{job_id}"


def remove_stale_uploads(store: JobStore) -> list[str]:
    """At start-up: remove the upload staging folders that no running server owns (this host's dead processes,
    the old unnamed ones, other hosts' after ``STALE_UPLOAD_SECONDS``). Returns their names."""
    from avatar.io.atomic import HOST

    folder, removed = store.upload_dir(new_id()).parent, []
    for entry in folder.glob(".incoming-*"):
        match = _STAGING.match(entry.name)
        if match is None:
            continue
        host, pid = match["host"], int(match["pid"] or 0)
        try:
            age = time.time() - entry.lstat().st_mtime
        except OSError:
            continue
        if (
            host is None
            or (host == HOST and (pid == os.getpid() or not _pid_alive(pid)))
            or age > STALE_UPLOAD_SECONDS
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def accept_job(cfg: RunConfig, store: JobStore, form, sequence_degree: int = 1) -> str:
    """Validate one ``POST /v1/videos`` form (a starlette ``FormData``), store its files and queue the job.
    ``sequence_degree``: the plan's ring·ulysses (the xfuser backend's token rule). Returns the job id; raises
    ``HTTPProblem``. Nothing stays on disk when it raises."""
    serve = cfg.serve
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        raise HTTPProblem(400, f"unknown field(s) {', '.join(unknown)}; send {', '.join(FIELDS)}")
    image = form.getlist("image")
    if len(image) != 1 or isinstance(image[0], str):
        raise HTTPProblem(400, "send one multipart file field image=<portrait> (and audio=<speech>)")
    tracks = form.getlist("audio")
    if not tracks or any(isinstance(t, str) for t in tracks):
        raise HTTPProblem(400, "missing audio: send multipart file fields image=<portrait> and audio=<speech>")
    speakers = request_speakers(form.getlist("speakers"), len(tracks))
    ours = request_config(cfg, form)
    names = {"image": display_name(image[0].filename, "image")}
    files = {"image": image[0]}
    for i, upload in enumerate(tracks):
        field = track_file(i)
        names[field], files[field] = display_name(upload.filename, field), upload
    if image[0].size is not None and image[0].size > serve.max_image_mb * MIB:
        raise HTTPProblem(
            413,
            f"image={names['image']} is {image[0].size / MIB:.1f} MiB; at most {serve.max_image_mb:g} MiB "
            "(serve.max_image_mb)",
        )
    audio_bytes = sum(t.size or 0 for t in tracks)
    if audio_bytes > serve.max_audio_mb * MIB:
        what = f"audio={names['audio']} is" if len(tracks) == 1 else f"the {len(tracks)} audio files are"
        raise HTTPProblem(
            413, f"{what} {audio_bytes / MIB:.1f} MiB; at most {serve.max_audio_mb:g} MiB (serve.max_audio_mb)"
        )
    if store.count_active() >= serve.max_queue:
        raise HTTPProblem(429, f"the queue is full ({serve.max_queue} jobs, serve.max_queue); try again later")

    job_id = new_id()
    staging, target = staging_dir(store, job_id), store.upload_dir(job_id)
    audio_name = ", ".join(names[track_file(i)] for i in range(len(tracks)))
    added = False
    try:
        staging.mkdir(parents=True)
        for field, upload in files.items():
            upload.file.seek(0)
            with open(staging / field, "wb") as out:
                shutil.copyfileobj(upload.file, out, MIB)
        if speakers is not None:
            (staging / SPEAKERS_FILE).write_text(json.dumps(speakers, indent=1))
        segments = _validate_files(ours, staging, names, job_id, store, sequence_degree)
        os.replace(staging, target)
        added = store.add(
            job_id,
            prompt=ours.prompt,
            seed=ours.seed,
            steps=ours.sampling.steps,
            image_name=names["image"],
            audio_name=audio_name,
            max_active=serve.max_queue,
        )
        if not added:
            raise HTTPProblem(429, f"the queue is full ({serve.max_queue} jobs, serve.max_queue); try again later")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if not added:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if segments:
        try:  # only the progress of the job's rounds needs it: a fault here does not refuse the queued job
            store.set_segments(job_id, segments)
        except storage_errors() as err:
            log.error("job %s: its segment count was not stored (%s)", job_id, describe_fault(err))
    log.info(
        "queued %s (image %s, audio %s%s, seed %d, %d steps%s)",
        job_id,
        names["image"],
        audio_name,
        f", {len(speakers['speakers'])} speakers" if speakers is not None else "",
        ours.seed,
        ours.sampling.steps,
        f", {segments} segments" if segments else "",
    )
    return job_id


def request_speakers(fields: list, tracks: int) -> dict | None:
    """The request's ``speakers`` fields (one JSON speaker object each, or a JSON list of them) as the contract's
    object form over the stored audio files: one track per speaker (the i-th ``audio`` file is the i-th speaker's),
    or, when the speakers give ``turns``, the one ``audio`` file as their shared recording. None without speakers.
    A speaker may not name a path (``audio``): its track is an uploaded file. Raises ``HTTPProblem``."""
    from avatar.io.speakers import SPEAKER_KEYS, strict_json

    if not fields:
        if tracks > 1:
            raise HTTPProblem(
                400,
                f"{tracks} audio files without speakers; send one speakers field per audio file (JSON, e.g. "
                '{"face": "auto", "name": "Ann"}), in the same order',
            )
        return None
    entries = []
    for k, text in enumerate(fields, 1):
        if not isinstance(text, str):
            raise HTTPProblem(400, f"speakers field {k} is a file; send it as a text field (JSON)")
        try:
            value = strict_json(text)
        except ValueError as err:
            raise HTTPProblem(
                400,
                f"speakers field {k} is not valid JSON ({' '.join(str(err).split())[:80]}); send an object "
                'like {"face": "auto", "name": "Ann"}',
            ) from None
        entries.extend(value if isinstance(value, list) else [value])
    if len(entries) > MAX_SPEAKERS:
        raise HTTPProblem(400, f"{len(entries)} speakers; at most {MAX_SPEAKERS} in one request")
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise HTTPProblem(400, f'speaker {i}: expected an object {{"face": ..., "name": ...}}, got {entry!r:.60}')
        if "audio" in entry:
            raise HTTPProblem(
                400, f"speaker {i} audio: a server does not read paths; send the track as the {_nth(i)} audio file"
            )
        unknown = sorted(set(entry) - set(SPEAKER_KEYS))
        if unknown:
            valid = ", ".join(k for k in SPEAKER_KEYS if k != "audio")
            raise HTTPProblem(400, f"speaker {i} {str(unknown[0])[:40]}: unknown field; valid fields are {valid}")
    if any("turns" in entry for entry in entries):
        if tracks != 1:
            raise HTTPProblem(
                400, f"the speakers take turns of one shared recording: send one audio file, not {tracks}"
            )
        return {"audio": track_file(0), "speakers": entries}
    if tracks != len(entries):
        raise HTTPProblem(
            400,
            f"{len(entries)} speakers and {tracks} audio files; send one audio file per speaker, in the same "
            "order (or turns of one shared recording)",
        )
    return {"speakers": [{**entry, "audio": track_file(i)} for i, entry in enumerate(entries)]}


def _nth(i: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(i, f"{i}th")


def audio_limit(cfg: RunConfig) -> float:
    """Longest audio the server accepts: ``serve.max_audio_seconds``, or ``audio.max_seconds`` when smaller."""
    limits = [cfg.serve.max_audio_seconds] + ([cfg.audio.max_seconds] if cfg.audio.max_seconds else [])
    return min(limits)


def _validate_files(cfg: RunConfig, folder: Path, names: dict, job_id: str, store, sequence_degree: int) -> int | None:
    """The command line's checks of the request's job on the stored files, after the server's image-size cap.
    Returns the number of segments the job renders under the ``segments`` strategy (None for the others)."""
    from PIL import Image

    from avatar.validate import check_job

    capped = replace(cfg, audio=replace(cfg.audio, max_seconds=audio_limit(cfg)))
    try:
        job = stored_job(cfg, folder, str(store.result_path(job_id)), job_id)
    except InputError as err:
        raise HTTPProblem(400, _client_message(str(err), folder, names)) from None
    try:  # the size from the header, before anything is decoded (an unreadable file is check_job's to name)
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
        check_job(
            capped,
            job,
            {"image": job.image, **job.audio_files()},
            overwrite=False,
            sequence_degree=sequence_degree,
        )
    except InputError as err:
        message = _client_message(str(err), folder, names)
        if cfg.audio.max_seconds is None or cfg.serve.max_audio_seconds < cfg.audio.max_seconds:
            message = message.replace("audio.max_seconds", "serve.max_audio_seconds")
        raise HTTPProblem(400, message) from None
    tracks = job.speakers.tracks if job.speakers is not None else [job.audio]
    counts = [segment_count(capped, track) for track in tracks]
    return max(counts) if counts[0] is not None else None


def _client_message(message: str, folder: Path, names: dict) -> str:
    """A validation message with the client's file names in place of the stored paths (the longest first, so that
    ``audio`` never replaces part of ``audio_2``) and the speakers fields in place of the stored JSON."""
    message = message.replace(f"speakers={folder / SPEAKERS_FILE}:", "speakers:")
    for field in sorted(names, key=len, reverse=True):
        message = message.replace(str(Path(os.path.abspath(folder)) / field), names[field])
        message = message.replace(str(folder / field), names[field])
    return message


def segment_count(cfg: RunConfig, audio: str) -> int | None:
    """How many segments the renderer's strategy splits this audio into (None unless it is ``segments``)."""
    from avatar.config import FPS
    from avatar.io.audio import load_audio
    from avatar.pipeline import strategies

    wav = load_audio(audio, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds, allow_damaged=True)
    num_frames = max(1, round(len(wav) * FPS / cfg.audio.sample_rate))
    strategy = strategies.for_run(cfg, str(cfg.long.strategy), num_frames)
    return len(strategy.plan) if strategy.name == "segments" else None


# --- what a client sees ---------------------------------------------------------------------------------------------


def api_status(job: dict) -> str:
    return API_STATUS.get(job["status"], job["status"])


def _stamp(value) -> int | None:
    return None if value is None else int(value)


def read_segments(store: JobStore, job_id: str) -> list[dict]:
    """The finished segments listed in the job's ``manifest.json`` (each one a complete mp4)."""
    try:
        manifest = json.loads((store.segments_dir(job_id) / "manifest.json").read_text())
        entries = list(manifest["segments"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not _SEGMENT_FILE.match(str(entry.get("file", ""))):
            continue
        out.append(
            {
                "index": int(entry["index"]),
                "url": f"/v1/videos/{job_id}/segments/{int(entry['index'])}",
                "start_seconds": entry.get("start_seconds"),
                "duration_seconds": entry.get("duration_seconds"),
                "num_frames": entry.get("num_frames"),
                "file": entry["file"],
            }
        )
    return out


def job_view(store: JobStore, job: dict, model: str = "", segments: list | None = None) -> dict:
    """What ``GET /v1/videos/{id}`` answers (``segments``: the finished ones, read when not given)."""
    status = api_status(job)
    total, step = job["total"], job["step"]
    percent = 100 if status == "completed" else min(99, int(job.get("percent") or 0))
    eta = job.get("eta") if job.get("eta") is not None else job.get("eta_seconds")
    base = f"/v1/videos/{job['id']}"
    out = {
        "id": job["id"],
        "object": "video",
        "model": model,
        "status": status,
        "progress": percent,
        "step": step,
        "total_steps": total,
        "eta_seconds": eta if status == "in_progress" else None,
        "created_at": _stamp(job["created"]),
        "started_at": _stamp(job["started"]),
        "completed_at": _stamp(job["finished"]),
        "prompt": job["prompt"],
        "seed": job["seed"],
        "steps": job["steps"],
        "image": job["image_name"],
        "audio": job["audio_name"],
        "queue_position": store.position(job["id"]) if job["status"] == "queued" else None,
        "cancel_requested": bool(job.get("cancel_requested")),
        "checkpoint_step": job["checkpoint_step"],
        "resumed_from_step": job["resumed_from_step"],
        "error": {"code": "render_failed", "message": job["error"]} if job["error"] else None,
        "result": job["report"],
        "segments": None,
        "urls": {"events": f"{base}/events"},
    }
    if job.get("segments"):
        done = read_segments(store, job["id"]) if segments is None else segments
        out["segments"] = {"total": job["segments"], "done": len(done)}
        out["urls"]["segments"] = f"{base}/segments"
    if status == "completed":
        out["urls"].update(content=f"{base}/content", report=f"{base}/report")
        out["content_url"] = f"{base}/content"
    return out


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# --- the app --------------------------------------------------------------------------------------------------------


def create_app(
    cfg: RunConfig, store: JobStore, wake: threading.Event | None = None, ready=lambda: True, sequence_degree: int = 1
):
    """The FastAPI app. ``wake`` is set whenever a job is queued (the worker loop waits on it); ``ready()`` says
    whether the models are loaded; ``sequence_degree`` is the plan's ring·ulysses (uploads are checked against it).
    Creating it removes the upload staging folders a killed server left behind."""
    serve = cfg.serve
    max_body = int((serve.max_image_mb + serve.max_audio_mb) * MIB) + BODY_SLACK
    page = resources.files("avatar.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    app = FastAPI(title="avatar-launcher", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    app.state.closing = threading.Event()  # set by HttpServer.stop: event streams end
    key = serve.api_key.encode("utf-8") if serve.api_key else None
    model = cfg.model.name
    stale = remove_stale_uploads(store)
    if stale:
        log.warning("removed %d unfinished upload(s) a stopped server left: %s", len(stale), ", ".join(stale))

    def problem(status: int, message: str, headers: dict | None = None):
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def fault(request: Request, err: BaseException):
        log.error("storage fault on %s %s: %s", request.method, request.url.path, describe_fault(err))
        return problem(503, f"the server's storage failed ({describe_fault(err)}); try again later")

    for kind in storage_errors():
        app.add_exception_handler(kind, fault)

    def find(job_id: str):
        job = store.get(job_id)
        if job is None:
            raise HTTPProblem(404, f"no job {job_id[:40]!r}")
        return job

    @app.exception_handler(HTTPProblem)
    def refused(request: Request, err: HTTPProblem):
        return problem(err.status, err.message)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            if key is not None:
                # header bytes as sent (starlette decodes them as latin-1), so any UTF-8 key compares exactly
                scheme, _, token = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), key):
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
            form = await request.form(max_files=1 + MAX_SPEAKERS, max_fields=len(FIELDS) + MAX_SPEAKERS)
        except Exception as err:  # noqa: BLE001 - a malformed body is the client's problem
            return problem(
                400,
                f"could not read the multipart form ({' '.join(str(err).split())}); a request has one image, "
                f"at most {MAX_SPEAKERS} audio files and {MAX_SPEAKERS} speakers fields",
            )
        try:
            job_id = await run_in_threadpool(accept_job, cfg, store, form, sequence_degree)
        finally:
            await form.close()
        view = await run_in_threadpool(lambda: job_view(store, store.get(job_id), model))
        if wake is not None:
            wake.set()
        return JSONResponse(view, status_code=202, headers={"Location": f"/v1/videos/{job_id}"})

    @app.get("/v1/videos")
    def list_jobs(limit: str = "20", after: str | None = None, order: str = "desc"):
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise HTTPProblem(400, f"limit={limit[:20]!r} is invalid; give 1-100")
        if order not in ("desc", "asc"):
            raise HTTPProblem(400, f"order={order[:20]!r} is invalid; give desc or asc")
        if after is not None and store.get(after) is None:
            raise HTTPProblem(400, f"after={after[:40]!r} is not a job; give the last id of the previous page")
        jobs, more = store.page(int(limit), after, order)
        data = [job_view(store, job, model) for job in jobs]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }

    @app.get("/v1/videos/{job_id}")
    def status(job_id: str):
        return job_view(store, find(job_id), model)

    @app.delete("/v1/videos/{job_id}")
    def cancel(job_id: str):
        job = find(job_id)
        if api_status(job) in FINISHED:
            if store.delete(job_id):
                store.free_files(job_id)
                log.info("deleted %s (%s) and its files", job_id, api_status(job))
            return {"id": job_id, "object": "video.deleted", "deleted": True}
        after = store.request_cancel(job_id)
        if after == "cancelled":
            store.free_files(job_id)
            log.info("cancelled %s before it started; its files are removed", job_id)
        else:
            log.info("cancel requested for %s (%s): it stops after the next step", job_id, after)
        job = store.get(job_id)
        if job is None:
            raise HTTPProblem(404, f"no job {job_id[:40]!r}")
        view = job_view(store, job, model)
        return JSONResponse(view, status_code=200 if view["status"] in FINISHED else 202)

    def finished_file(job_id: str, what: str, path_of) -> Path:
        job = find(job_id)
        if api_status(job) != "completed":
            raise HTTPProblem(409, f"job {job_id} is {api_status(job)}; its {what} is ready once it has completed")
        path = path_of(job_id)
        if not path.is_file():
            raise HTTPProblem(410, f"the {what} of job {job_id} is no longer on the server")
        return path

    @app.get("/v1/videos/{job_id}/content")
    def content(job_id: str):
        path = finished_file(job_id, "video", store.result_path)
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.get("/v1/videos/{job_id}/report")
    def report(job_id: str):
        path = finished_file(job_id, "report", store.report_path)
        return FileResponse(path, media_type="application/json", filename=f"{job_id}.json")

    @app.get("/v1/videos/{job_id}/segments")
    def segments(job_id: str):
        job = find(job_id)
        done = read_segments(store, job_id)
        return {"object": "list", "data": done, "total": job.get("segments"), "status": api_status(job)}

    @app.get("/v1/videos/{job_id}/segments/{index}")
    def segment(job_id: str, index: str):
        job = find(job_id)
        total = job.get("segments")
        if not total:
            raise HTTPProblem(404, f"job {job_id} is not rendered in segments (long.strategy=segments, long audio)")
        if not index.isdigit() or int(index) >= total:
            raise HTTPProblem(404, f"segment {index[:20]!r} is invalid; job {job_id} has segments 0-{total - 1}")
        found = [s for s in read_segments(store, job_id) if s["index"] == int(index)]
        if not found:
            raise HTTPProblem(
                409 if api_status(job) not in FINISHED else 410,
                f"segment {index} of job {job_id} is not rendered yet"
                if api_status(job) not in FINISHED
                else f"segment {index} of job {job_id} is no longer on the server",
            )
        path = store.segments_dir(job_id) / found[0]["file"]
        if not path.is_file():
            raise HTTPProblem(410, f"segment {index} of job {job_id} is no longer on the server")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}-segment-{int(index):04d}.mp4")

    @app.get("/v1/videos/{job_id}/events")
    async def events(job_id: str, request: Request):
        await run_in_threadpool(find, job_id)

        def look():
            job = store.get(job_id)  # the status first: a completed job's manifest is already complete
            return job, (read_segments(store, job_id) if job is not None else [])

        async def stream():
            sent: set[int] = set()
            last, quiet = None, time.monotonic()
            yield b"retry: 2000\n\n"
            while not app.state.closing.is_set() and not await request.is_disconnected():
                job, done = await run_in_threadpool(look)
                if job is None:
                    yield _sse("error", {"error": f"job {job_id} was deleted"})
                    return
                for seg in done:
                    if seg["index"] not in sent:
                        sent.add(seg["index"])
                        yield _sse("segment", seg)
                view = job_view(store, job, model, done)
                changed = (view["status"], view["progress"], view["step"], view["queue_position"], len(sent))
                if changed != last:
                    last, quiet = changed, time.monotonic()
                    yield _sse("progress", view)
                if view["status"] in FINISHED:
                    yield _sse("done", view)
                    return
                if time.monotonic() - quiet > EVENT_KEEPALIVE_SECONDS:
                    quiet = time.monotonic()
                    yield b": keep-alive\n\n"
                await asyncio.sleep(EVENT_POLL_SECONDS)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return app


# --- the API key ----------------------------------------------------------------------------------------------------


def with_api_key(cfg: RunConfig, environ_key: str | None) -> RunConfig:
    """The config with its API key from ``serve.api_key``, else ``serve.api_key_file`` (its text, one trailing
    newline dropped), else ``environ_key`` (``AVATAR_API_KEY``, read by the launcher). Giving both ``serve.api_key``
    and ``serve.api_key_file`` is an error (raises InputError)."""
    serve = cfg.serve
    key = serve.api_key
    if serve.api_key_file:
        if key is not None:
            raise InputError("serve.api_key and serve.api_key_file are both set; give one of them")
        path = Path(serve.api_key_file)
        try:
            key = path.read_bytes().decode("utf-8")
        except OSError as err:
            raise InputError(f"serve.api_key_file={path}: cannot read it ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise InputError(f"serve.api_key_file={path}: not UTF-8 text") from None
        key = key.removesuffix("\n").removesuffix("\r")
        if not key:
            raise InputError(f"serve.api_key_file={path} is empty; write the key in it")
    elif key is None and environ_key:
        key = environ_key
    return cfg if key == serve.api_key else replace(cfg, serve=replace(serve, api_key=key))


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
    if cfg.sampling.steps > serve.max_steps:
        raise InputError(
            f"sampling.steps={cfg.sampling.steps} is over serve.max_steps={serve.max_steps}; lower one or raise the other"
        )
    key = serve.api_key
    if key is not None:
        if not key.strip():
            raise InputError("serve.api_key is empty; give a secret or leave it unset")
        if key != key.strip() or any(unicodedata.category(ch) == "Cc" for ch in key):
            raise InputError(
                "serve.api_key starts or ends with a space or holds a control character (a tab, a newline): "
                "an HTTP header cannot carry it; give a key without them"
            )


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

        self.sock, self.app = sock, app
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
        )
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
        closing = getattr(getattr(self.app, "state", None), "closing", None)
        if closing is not None:  # open event streams end, so the shutdown does not wait on them
            closing.set()
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()
