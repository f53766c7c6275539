"""Batch rows: validate every row before any model is built, shard over Slurm array tasks, spread over
data-parallel groups, and summarise (every line of the manifest accounted for). The strict reader is
``avatar/io/manifest.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from avatar.config import OnError
from avatar.io.errors import InputError
from avatar.io.manifest import Manifest, Row, read_manifest, row_problem

log = logging.getLogger(__name__)

__all__ = ["BatchSummary", "Manifest", "Row", "assign_rows", "read_manifest", "shard_rows", "validate_rows"]


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
