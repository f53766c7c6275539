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
import sys
import time
import uuid
from pathlib import Path

from avatar.config import RunConfig
from avatar.io.errors import WRITE_ERRNOS, OutputConflict
from avatar.pipeline.batch import BatchSummary
from avatar.pipeline.resume import Preempted, job_state
from avatar.pipeline.state import StateStore, batch_state_dir
from launch.config import help_text, wants_help

log = logging.getLogger("launch.batch")

SUMMARY_FILE = "batch_summary.json"

HELP = help_text(
    "python -m launch.batch | torchrun --nproc_per_node=N -m launch.batch",
    "Render every row of a manifest (CSV videoid,image,audio,prompt,fps or JSON Lines) into output_dir/<videoid>.mp4,\n"
    "models loaded once, rows spread over the data-parallel groups. Every row is validated before any model is\n"
    "built; a rerun skips finished rows and resumes the one in progress; output_dir/batch_summary.json accounts for\n"
    "every line of the manifest (done, skipped with reason, failed with reason). The same as launch.generate batch=.",
    [
        "python -m launch.batch model=tiny weights=weights/tiny batch=rows.csv output_dir=outputs/batch",
        "torchrun --nproc_per_node=8 -m launch.batch batch=rows.jsonl output_dir=out parallel.data=4",
        "python -m launch.batch batch=rows.csv output_dir=out batch.on_error=skip batch.shard_index=0 "
        "batch.shard_count=4",
    ],
)


def run_batch(cfg: RunConfig, batch, renderer, job_topo, rows_topo, preemption) -> int:
    """Render this group's rows of the validated batch (``launch.validate.Validated``); rank 0 gathers the groups'
    summaries. Returns the exit code (1 if a row failed). ``output_dir`` is created here, after validation."""
    from avatar.pipeline.run import config_dict

    if job_topo.is_main:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    job_topo.barrier()
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
        except OutputConflict as err:
            log.error("%s: %s", job.videoid, err)
            summary.add_failed(job.videoid, str(err))
            continue
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                log.exception("%s failed", job.videoid)
            else:
                log.error("%s: %s", job.videoid, err)
            summary.add_failed(job.videoid, str(err) if err.errno in WRITE_ERRNOS else f"{type(err).__name__}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 (a failed row is reported; the batch goes on)
            log.exception("%s failed", job.videoid)
            summary.add_failed(job.videoid, f"{type(err).__name__}: {err}")
            continue
        summary.add_done(job.videoid, job.output, time.perf_counter() - start)
    return _finish(cfg, summary, job_topo, rows_topo, run_id, batch)


def _finish(cfg: RunConfig, summary: BatchSummary, job_topo, rows_topo, run_id: str, batch=None) -> int:
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
    if batch is not None and batch.manifest is not None:
        merged.account(batch.manifest, batch.shard_rows)
    atomic_write_json(Path(cfg.output_dir) / SUMMARY_FILE, json.loads(merged.to_json()))
    text = merged.format()
    log.info("%s\n  summary: %s", text, os.path.join(cfg.output_dir, SUMMARY_FILE))
    print(text, flush=True)
    return 0 if merged.ok else 1


def main(argv: list[str] | None = None) -> int:
    from launch.run import main as run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    return run_main(argv, require_batch=True)


if __name__ == "__main__":
    raise SystemExit(main())
