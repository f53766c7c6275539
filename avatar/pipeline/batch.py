"""Batch rows: validate every row before any model is built, shard over Slurm array tasks, spread over
data-parallel groups, render them (``run_batch``) and summarise (every line of the manifest accounted for). The strict
reader is ``avatar/io/manifest.py``.

One launch loads the models once; the rows are dealt round-robin to the plan's data-parallel groups, each group
renders its rows with its own ranks (CFG and sequence parallel inside the group), and a row's video does not depend
on which group rendered it. The resume state lives in ``DIR/.state``: finished rows are skipped, the row in progress
continues from its last checkpoint, and a row whose inputs or settings changed starts afresh with the reason logged.
At the end rank 0 prints the summary and writes ``DIR/batch_summary.json``."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from avatar.config import OnError, RunConfig
from avatar.io.errors import WRITE_ERRNOS, InputError, OutputConflict
from avatar.io.manifest import Manifest, Row, read_manifest, row_problem
from avatar.pipeline.resume import Preempted, job_state
from avatar.pipeline.state import StateStore, batch_state_dir, restore_report
from avatar.pipeline.work import group_rows

log = logging.getLogger(__name__)

__all__ = [
    "BatchSummary",
    "Manifest",
    "Row",
    "assign_rows",
    "read_manifest",
    "run_batch",
    "shard_rows",
    "validate_rows",
]


def validate_rows(
    rows: list[Row], on_error: str = "stop", check_row: Optional[Callable[[Row], None]] = None
) -> tuple[list[Row], list[tuple[Row, str]]]:
    """Check every row (parse problems, empty fields, duplicate videoids, fps, then ``check_row``, which raises a
    ``ValueError``/``OSError`` naming the problem with the row's files). Returns ``(good, bad)``; with ``stop`` any
    bad row raises ``InputError`` naming the first one and the number of others."""
    if on_error not in OnError.__members__:
        raise InputError(f"batch.on_error={on_error!r} is not valid; choose one of: {', '.join(OnError)}")
    good, bad = [], []
    first_line: dict[str, int] = {}
    for row in rows:
        problem = row_problem(row)
        if not problem and row.videoid in first_line:
            problem = f"duplicate videoid {row.videoid!r} (first used on line {first_line[row.videoid]})"
        if row.videoid and row.videoid not in first_line:
            first_line[row.videoid] = row.line
        if not problem and check_row is not None:
            try:
                check_row(row)
            except (ValueError, OSError) as err:
                problem = str(err) or type(err).__name__
        if problem:
            bad.append((row, problem))
        else:
            good.append(row)
    if bad and on_error == "stop":
        row, problem = bad[0]
        more = (
            f" (and {len(bad) - 1} more bad row(s); batch.on_error=skip renders the good ones)" if len(bad) > 1 else ""
        )
        raise InputError(f"{row.where}: {problem}{more}")
    for row, problem in bad:
        log.warning("skipping %s: %s", row.where, problem)
    return good, bad


def shard_rows(rows: list[Row], index: int, count: int) -> list[Row]:
    """Rows of shard ``index`` of ``count`` (Slurm array tasks). Round-robin over the manifest order: shard i gets
    rows i, i+count, i+2*count, ..., so long and short rows from one stretch of the file spread over the shards.
    Deterministic; the shards are disjoint and together hold every row."""
    if count < 1:
        raise InputError(f"batch.shard_count={count} must be at least 1")
    if not 0 <= index < count:
        raise InputError(f"batch.shard_index={index} must be in 0..{count - 1} (batch.shard_count={count})")
    return rows[index::count]


def assign_rows(rows: list[Row], num_groups: int) -> list[list[Row]]:
    """Spread rows over data-parallel groups, round-robin in manifest order (group g renders rows g, g+n, ...)."""
    if num_groups < 1:
        raise ValueError(f"num_groups={num_groups} must be at least 1")
    return [rows[g::num_groups] for g in range(num_groups)]


@dataclass
class BatchSummary:
    """What a batch did. ``skipped``: not rendered (bad input in skip mode, or already done); ``failed``: rendering
    raised. ``lines``: what every line of the manifest was (``Manifest.accounting``) and which rows belong to other
    shards, so every input line is accounted for."""

    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    lines: dict = field(default_factory=dict)

    def add_done(self, videoid: str, output: str, seconds: float, line: Optional[int] = None) -> None:
        self.done.append(
            {"videoid": videoid, "line": line, "output": str(output), "seconds": round(float(seconds), 3)}
        )

    def account(self, manifest: Manifest, shard_rows: list[Row]) -> None:
        """Fill in the line of every entry (by videoid), record the manifest's line use and the rows of other
        shards, and list as failed any row of this shard that has no entry (its group never reported it)."""
        by_id = {row.videoid: row.line for row in shard_rows if row.videoid}
        for entry in self.done + self.skipped + self.failed:
            if entry.get("line") is None and entry.get("videoid") in by_id:
                entry["line"] = by_id[entry["videoid"]]
        seen = {entry.get("line") for entry in self.done + self.skipped + self.failed}
        for row in shard_rows:
            if row.line not in seen:
                self.add_failed(row.videoid, f"{row.where}: no result was reported for this row", row.line)
        mine = {row.line for row in shard_rows}
        self.lines = {**manifest.accounting(), "other_shards": [row.line for row in manifest if row.line not in mine]}

    def add_skipped(self, videoid: str, reason: str, line: Optional[int] = None) -> None:
        self.skipped.append({"videoid": videoid, "line": line, "reason": reason})

    def add_failed(self, videoid: str, reason: str, line: Optional[int] = None) -> None:
        self.failed.append({"videoid": videoid, "line": line, "reason": reason})

    def add_bad_rows(self, bad: list[tuple[Row, str]]) -> None:
        for row, reason in bad:
            self.add_skipped(row.videoid, f"{row.where}: {reason}", row.line)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> str:
        seconds = [d["seconds"] for d in self.done]
        data = {
            "num_done": len(self.done),
            "num_skipped": len(self.skipped),
            "num_failed": len(self.failed),
            "seconds_per_row": round(sum(seconds) / len(seconds), 3) if seconds else None,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "lines": self.lines,
        }
        return json.dumps(data, indent=2, ensure_ascii=False)

    def format(self) -> str:
        lines = [f"batch: {len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"]
        if self.done:
            mean = sum(d["seconds"] for d in self.done) / len(self.done)
            lines.append(f"  {mean:.1f} s per rendered row")
        lines += [f"  done    {d['videoid']}: {d['output']} ({d['seconds']:.1f} s)" for d in self.done]
        lines += [f"  skipped {d['videoid'] or '?'}: {d['reason']}" for d in self.skipped]
        lines += [f"  FAILED  {d['videoid'] or '?'}: {d['reason']}" for d in self.failed]
        return "\n".join(lines)


# --- rendering a validated batch ------------------------------------------------------------------------------

SUMMARY_FILE = "batch_summary.json"


def run_batch(cfg: RunConfig, batch, renderer, job_topo, rows_topo, preemption) -> int:
    """Render this group's rows of the validated batch (``avatar.validate.Validated``); rank 0 gathers the groups'
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
    mine = group_rows(batch.jobs, job_topo)
    config = config_dict(cfg)
    for job in mine:
        key, job_config = job_state(config, job)
        if state.is_done(key) and Path(job.output).is_file():
            log.info("%s: already done (%s), skipped", job.videoid, job.output)
            restored = restore_report(state, key, job.output) if rows_topo.is_main else None
            if restored:
                log.warning("%s: %s", job.videoid, restored)
            summary.add_skipped(job.videoid, f"already done: {job.output}")
            continue
        if rows_topo.is_main:
            reason = state.register(job.videoid, key, {"image": job.image, **job.audio_files()}, job_config)
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
