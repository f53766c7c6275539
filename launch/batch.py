"""Batch mode: ``batch=MANIFEST output_dir=DIR``.

All rows are validated before any model is built (``prepare_batch``). One launch loads the models once; the rows are
dealt round-robin to the plan's data-parallel groups, each group renders its rows with its own ranks (CFG and sequence
parallel inside the group), and a row's video does not depend on which group rendered it. The resume state lives in
``DIR/.state``: finished rows are skipped, the row in progress continues from its last checkpoint, and a row whose
inputs or settings changed starts afresh with the reason logged. At the end rank 0 prints the summary and writes
``DIR/batch_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from avatar.config import RunConfig
from avatar.io.errors import InputError
from avatar.pipeline.batch import BatchSummary, Row, read_manifest, shard_rows, validate_rows
from avatar.pipeline.resume import Preempted, job_state
from avatar.pipeline.state import StateStore, batch_state_dir

log = logging.getLogger("launch.batch")

SUMMARY_FILE = "batch_summary.json"


@dataclass
class Batch:
    """The validated rows of this launch's shard as jobs, and the rows skipped as bad."""

    jobs: list = field(default_factory=list)
    bad: list[tuple[Row, str]] = field(default_factory=list)


def row_job(cfg: RunConfig, row: Row):
    from avatar.pipeline.run import Job

    return Job(
        image=row.image,
        audio=row.audio,
        prompt=row.prompt or cfg.prompt,
        output=str(Path(cfg.output_dir) / f"{row.videoid}.mp4"),
        seed=int(row.overrides.get("seed", cfg.seed)),
        steps=int(row.overrides.get("steps", cfg.sampling.steps)),
        strategy=row.overrides.get("strategy", cfg.long.strategy),
        videoid=row.videoid,
    )


def prepare_batch(cfg: RunConfig) -> Batch:
    """Read, shard and validate the manifest (raises InputError for bad input with ``batch.on_error=stop``)."""
    from launch.generate import validate_job

    if not cfg.output_dir:
        raise InputError(f"batch={cfg.batch.manifest} needs output_dir=DIR (the folder of <videoid>.mp4 outputs)")
    rows = read_manifest(cfg.batch.manifest)
    index, count = cfg.batch.shard_index, cfg.batch.shard_count
    if (index is None) != (count is None):
        raise InputError("give both batch.shard_index and batch.shard_count, or neither")
    if count is not None:
        rows = shard_rows(rows, index, count)
        log.info("shard %d of %d: %d row(s)", index, count, len(rows))
    out_dir = Path(cfg.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"output_dir={out_dir} cannot be created: {err.strerror}") from None
    state = StateStore(batch_state_dir(out_dir))

    def check_row(row: Row) -> None:
        job = row_job(cfg, row)
        overwrite = cfg.overwrite or _done(state, cfg, job)
        validate_job(cfg, job, overwrite=overwrite)

    good, bad = validate_rows(rows, cfg.batch.on_error, check_row)
    return Batch(jobs=[row_job(cfg, row) for row in good], bad=bad)


def _done(state: StateStore, cfg: RunConfig, job) -> bool:
    from avatar.pipeline.run import config_dict

    try:
        key, _ = job_state(config_dict(cfg), job)
    except OSError:
        return False
    return state.is_done(key) and Path(job.output).is_file()


def run_batch(cfg: RunConfig, batch: Batch, renderer, job_topo, rows_topo, preemption) -> int:
    """Render this group's rows; rank 0 gathers the groups' summaries. Returns the exit code (1 if a row failed)."""
    from avatar.pipeline.run import config_dict

    state = StateStore(batch_state_dir(cfg.output_dir))
    run_id = job_topo.broadcast_object(uuid.uuid4().hex[:12] if job_topo.is_main else None)
    summary = BatchSummary()
    if job_topo.is_main:
        summary.add_bad_rows(batch.bad)
    mine = batch.jobs[job_topo.data_rank :: job_topo.data_size]
    config = config_dict(cfg)
    for job in mine:
        key, job_config = job_state(config, job)
        if state.is_done(key) and Path(job.output).is_file():
            log.info("%s: already done (%s), skipped", job.videoid, job.output)
            summary.add_skipped(job.videoid, f"already done: {job.output}")
            continue
        if rows_topo.is_main:
            reason = state.register(job.videoid, key, {"image": job.image, "audio": job.audio}, job_config)
            if reason:
                log.warning("%s starts afresh: %s", job.videoid, reason)
        rows_topo.barrier()
        start = time.perf_counter()
        try:
            renderer.render(job, state=state, preemption=preemption)
        except Preempted:
            raise
        except Exception as err:  # noqa: BLE001 (a failed row is reported; the batch goes on)
            log.exception("%s failed", job.videoid)
            summary.add_failed(job.videoid, f"{type(err).__name__}: {err}")
            continue
        summary.add_done(job.videoid, job.output, time.perf_counter() - start)
    return _finish(cfg, summary, job_topo, rows_topo, run_id)


def _finish(cfg: RunConfig, summary: BatchSummary, job_topo, rows_topo, run_id: str) -> int:
    """Each group's rank 0 writes its part; rank 0 waits for all parts (files, not a collective: a group may finish
    long before another), merges them and writes the summary."""
    from avatar.io.atomic import atomic_write_json

    parts = batch_state_dir(cfg.output_dir) / "summaries"
    if rows_topo.is_main:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(parts / f"{run_id}-{job_topo.data_rank}.json", json.loads(summary.to_json()))
    if not job_topo.is_main:
        return 0
    merged = BatchSummary()
    for group in range(job_topo.data_size):
        path = parts / f"{run_id}-{group}.json"
        while not path.is_file():
            time.sleep(0.5)
        data = json.loads(path.read_text())
        merged.done += data["done"]
        merged.skipped += data["skipped"]
        merged.failed += data["failed"]
        path.unlink()
    atomic_write_json(Path(cfg.output_dir) / SUMMARY_FILE, json.loads(merged.to_json()))
    text = merged.format()
    log.info("%s\n  summary: %s", text, os.path.join(cfg.output_dir, SUMMARY_FILE))
    print(text, flush=True)
    return 0 if merged.ok else 1
