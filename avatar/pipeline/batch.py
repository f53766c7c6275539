"""Batch manifests: read, validate every row before any model is built, shard over Slurm array tasks, spread over
data-parallel groups, and summarise.

Two formats are read:

- the official CSV (``videoid,image,audio,prompt,fps``, usually with a UTF-8 byte-order mark);
- JSON Lines, one object per line with the same fields plus optional per-row ``seed``, ``steps`` and ``strategy``.

Relative image/audio paths are resolved against the manifest's folder. Line numbers in messages are the physical
line of the row in the file (the CSV header is line 1).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from avatar.io.errors import InputError

log = logging.getLogger(__name__)

#: The official model only works at this frame rate (hunyuan_avatar.md §1.3).
OFFICIAL_FPS = 25
#: Columns of the official CSV; ``prompt`` and ``fps`` may be missing (default prompt ``""``, fps 25).
REQUIRED_COLUMNS = ("videoid", "image", "audio")
OPTIONAL_COLUMNS = ("prompt", "fps")
#: Per-row settings a JSON Lines manifest may override.
OVERRIDE_KEYS = ("seed", "steps", "strategy")
STRATEGIES = ("auto", "shift", "blend", "segments")
ON_ERROR = ("stop", "skip")


@dataclass(frozen=True)
class Row:
    """One manifest row. ``error`` holds a problem found while parsing; ``validate_rows`` reports it."""

    videoid: str
    image: str
    audio: str
    prompt: str
    fps: float
    line: int
    overrides: dict = field(default_factory=dict, hash=False)
    source: str = ""
    error: str = ""

    @property
    def where(self) -> str:
        """``manifest.csv line 4`` for messages."""
        return f"{self.source} line {self.line}"


def read_manifest(path: str | Path) -> list[Row]:
    """Rows of a CSV or JSON Lines manifest (chosen by the ``.jsonl``/``.json`` suffix, else CSV)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"batch manifest {path} does not exist (give batch=PATH to a .csv or .jsonl file)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"batch manifest {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _read_jsonl(text, path)
    else:
        rows = _read_csv(text, path)
    if not rows:
        raise InputError(f"batch manifest {path} has no rows")
    return rows


def _resolve(value: str, folder: Path) -> str:
    value = value.strip()
    if not value:
        return ""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (folder / p).resolve())


def _read_csv(text: str, path: Path) -> list[Row]:
    reader = csv.DictReader(text.splitlines(keepends=True), skipinitialspace=False)
    header = [name.strip() for name in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"batch manifest {path} line 1: missing column(s) {', '.join(missing)}; the header must be "
            f"videoid,image,audio,prompt,fps (got {','.join(header) or 'nothing'})"
        )
    reader.fieldnames = header
    rows = []
    for record in reader:
        line = reader.line_num
        if all(not (v or "").strip() for k, v in record.items() if k is not None):
            continue
        error = ""
        if None in record:
            error = f"{len(header) + len(record[None])} fields, the header has {len(header)}"
        fps, fps_error = _parse_fps(record.get("fps"))
        rows.append(
            Row(
                videoid=(record.get("videoid") or "").strip(),
                image=_resolve(record.get("image") or "", path.parent),
                audio=_resolve(record.get("audio") or "", path.parent),
                prompt=(record.get("prompt") or "").strip(),
                fps=fps,
                line=line,
                source=str(path),
                error=error or fps_error,
            )
        )
    return rows


def _parse_fps(value) -> tuple[float, str]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float(OFFICIAL_FPS), ""
    try:
        return float(value), ""
    except (TypeError, ValueError):
        return float("nan"), f"fps {value!r} is not a number (the official model needs 25)"


def _read_jsonl(text: str, path: Path) -> list[Row]:
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS) | set(OVERRIDE_KEYS)
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            rows.append(_broken_row(path, line, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append(_broken_row(path, line, f"expected a JSON object, got {type(record).__name__}"))
            continue
        errors = []
        unknown = sorted(set(record) - known)
        if unknown:
            errors.append(
                f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} "
                f"and the per-row overrides {', '.join(OVERRIDE_KEYS)}"
            )
        overrides, override_error = _parse_overrides(record)
        if override_error:
            errors.append(override_error)
        fps, fps_error = _parse_fps(record.get("fps"))
        if fps_error:
            errors.append(fps_error)
        rows.append(
            Row(
                videoid=str(record.get("videoid", "")).strip(),
                image=_resolve(str(record.get("image") or ""), path.parent),
                audio=_resolve(str(record.get("audio") or ""), path.parent),
                prompt=str(record.get("prompt") or "").strip(),
                fps=fps,
                line=line,
                overrides=overrides,
                source=str(path),
                error="; ".join(errors),
            )
        )
    return rows


def _broken_row(path: Path, line: int, error: str) -> Row:
    return Row(videoid="", image="", audio="", prompt="", fps=float("nan"), line=line, source=str(path), error=error)


def _parse_overrides(record: dict) -> tuple[dict, str]:
    overrides = {}
    for key in ("seed", "steps"):
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int):
                return {}, f"{key} {value!r} must be an integer"
            if key == "steps" and value < 1:
                return {}, f"steps {value} must be at least 1"
            overrides[key] = value
    if "strategy" in record:
        if record["strategy"] not in STRATEGIES:
            return {}, f"strategy {record['strategy']!r} is not valid; choose one of: {', '.join(STRATEGIES)}"
        overrides["strategy"] = record["strategy"]
    return overrides, ""


def row_problem(row: Row) -> str:
    """What is wrong with a row on its own (without opening its files), or ``""``."""
    if row.error:
        return row.error
    if not row.videoid:
        return "videoid is empty"
    if "/" in row.videoid or "\\" in row.videoid or row.videoid in (".", ".."):
        return f"videoid {row.videoid!r} must be a plain file name (it names <output_dir>/<videoid>.mp4)"
    if not row.image:
        return "image is empty"
    if not row.audio:
        return "audio is empty"
    if row.fps != OFFICIAL_FPS:
        return f"fps {row.fps:g} is not supported: the official model only works at 25 fps"
    return ""


def validate_rows(
    rows: list[Row], on_error: str = "stop", check_row: Optional[Callable[[Row], None]] = None
) -> tuple[list[Row], list[tuple[Row, str]]]:
    """Check every row (parse problems, empty fields, duplicate videoids, fps, then ``check_row``, which raises a
    ``ValueError``/``OSError`` naming the problem with the row's files). Returns ``(good, bad)``; with ``stop`` any
    bad row raises ``InputError`` naming the first one and the number of others."""
    if on_error not in ON_ERROR:
        raise InputError(f"batch.on_error={on_error!r} is not valid; choose one of: {', '.join(ON_ERROR)}")
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
    raised."""

    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)

    def add_done(self, videoid: str, output: str, seconds: float) -> None:
        self.done.append({"videoid": videoid, "output": str(output), "seconds": round(float(seconds), 3)})

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
