"""Batch manifests, read strictly: every physical line is a header, a blank line or exactly one row.

Two formats:

- the official CSV (``videoid,image,audio,prompt,fps``, usually with a UTF-8 byte-order mark), optionally with the
  per-row columns ``seed``, ``steps`` and ``strategy`` (an empty cell keeps the command's value);
- JSON Lines, one object per line with the same fields and per-row keys, and ``speakers`` (several speakers: a
  JSON file or the list inline, ``avatar/io/speakers.py``; then ``audio`` is the shared recording of turns or
  absent).

Both are strict about names: a CSV header with a column that is not one of those (or one named twice) refuses the
manifest, and a JSON key that is not one of them refuses the row, naming the unknown names and the valid ones, so a
misspelt or unsupported setting is never silently dropped. JSON ``null`` is refused for every key (leave the key out
for its default); strings must be strings.

Each line is parsed on its own, so one bad line never swallows the next ones: an unterminated quote, text after a
closing quote, a wrong number of fields, bytes that are not UTF-8 or stray control bytes (NUL, ESC, a lone carriage
return...) make *that* row bad, naming its line and column; the rows around it are read normally. A CSV field cannot
span lines (a prompt is one line). Relative image/audio paths are resolved against the manifest's folder. Line numbers
are the physical lines of the file (the CSV header is line 1). ``Manifest`` (a list of ``Row``) also records the
blank lines, so a batch accounts for every line of its input.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from avatar.config import FPS, SEED_MAX, Strategy
from avatar.io.errors import InputError
from avatar.io.paths import check_input_file

#: Columns of the official CSV; ``prompt`` and ``fps`` may be missing (default prompt ``""``, fps 25).
REQUIRED_COLUMNS = ("videoid", "image", "audio")
OPTIONAL_COLUMNS = ("prompt", "fps")
#: Per-row settings a manifest may override (CSV columns or JSON keys).
OVERRIDE_KEYS = ("seed", "steps", "strategy")
#: Every column/key a manifest may use.
VALID_KEYS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS + OVERRIDE_KEYS
#: JSON Lines keys: every column, and ``speakers`` (several speakers, ``avatar/io/speakers.py``).
JSON_KEYS = (*VALID_KEYS, "speakers")
#: Keys whose value must be a JSON string.
STRING_KEYS = ("videoid", "image", "audio", "prompt")


def _valid_names() -> str:
    return f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)} and the per-row overrides {', '.join(OVERRIDE_KEYS)}"


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
    speakers: object = field(default=None, hash=False, compare=False)
    """Several speakers (a ``avatar.io.speakers.SpeakerSpec``; JSON Lines ``"speakers"``): then ``audio`` is
    the shared recording of turns, or empty."""

    @property
    def where(self) -> str:
        """``manifest.csv line 4`` for messages."""
        return f"{self.source} line {self.line}"


class Manifest(list):
    """The rows of a manifest (a list of ``Row``) and how every other line was used."""

    def __init__(self, rows=(), path: str = "", num_lines: int = 0, header_lines=(), blank_lines=()):
        super().__init__(rows)
        self.path = path
        self.num_lines = num_lines
        self.header_lines = list(header_lines)
        self.blank_lines = list(blank_lines)

    def accounting(self) -> dict:
        """What each line of the file is: ``{"lines": N, "header": [...], "blank": [...], "rows": [...]}``."""
        return {
            "manifest": self.path,
            "lines": self.num_lines,
            "header": self.header_lines,
            "blank": self.blank_lines,
            "rows": [row.line for row in self],
        }


def read_manifest(path: str | Path) -> Manifest:
    """Rows of a CSV or JSON Lines manifest (chosen by the ``.jsonl``/``.json`` suffix, else CSV)."""
    path = Path(path)
    check_input_file(str(path), "batch", "a .csv or .jsonl manifest")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    lines: list[tuple[str, str]] = []  # (text, error)
    for raw in raw_lines:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            lines.append(("", f"not UTF-8 text ({err.reason} at byte {err.start + 1} of the line)"))
            continue
        lines.append((text, _stray_byte(text)))
    if path.suffix.lower() in (".jsonl", ".json"):
        manifest = _read_jsonl(lines, path)
    else:
        manifest = _read_csv(lines, path)
    if not manifest:
        raise InputError(f"batch manifest {path} has no rows")
    return manifest


def _stray_byte(text: str) -> str:
    for column, char in enumerate(text, start=1):
        if (ord(char) < 32 and char != "\t") or ord(char) == 0x7F:
            return f"stray control byte 0x{ord(char):02x} at column {column}"
    return ""


def _resolve(value: str, folder: Path) -> str:
    value = value.strip()
    if not value:
        return ""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (folder / p).resolve())


def _parse_line(text: str) -> tuple[list[str], str]:
    try:
        return next(csv.reader([text], strict=True)), ""
    except csv.Error as err:
        reason = str(err)
        if "unexpected end of data" in reason:
            reason = "unterminated quote (a quoted field must close on the same line)"
        return [], f"not valid CSV: {reason}"
    except StopIteration:
        return [], ""


def _read_csv(lines: list[tuple[str, str]], path: Path) -> Manifest:
    header_at = next((i for i, (text, error) in enumerate(lines) if error or text.strip()), None)
    if header_at is None:
        raise InputError(f"batch manifest {path} has no rows")
    text, error = lines[header_at]
    fields, parse_error = _parse_line(text)
    header = [name.strip() for name in fields]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if error or parse_error or missing:
        raise InputError(
            f"batch manifest {path} line {header_at + 1}: the header must be videoid,image,audio,prompt,fps "
            f"({error or parse_error or 'missing column(s) ' + ', '.join(missing)}; got {text[:80]!r})"
        )
    unknown = [name for name in header if name not in VALID_KEYS]
    twice = sorted({name for name in header if header.count(name) > 1})
    if unknown or twice:
        problem = f"unknown column(s) {', '.join(repr(n) for n in unknown)}" if unknown else ""
        problem += ("; " if unknown and twice else "") + (
            f"column(s) named twice: {', '.join(twice)}" if twice else ""
        )
        raise InputError(
            f"batch manifest {path} line {header_at + 1}: {problem}; valid columns: {_valid_names()} "
            "(a column is never ignored: remove it or fix its name)"
        )
    blank = [i + 1 for i, (t, e) in enumerate(lines[:header_at]) if not e and not t.strip()]
    rows = []
    for index in range(header_at + 1, len(lines)):
        number = index + 1
        text, error = lines[index]
        if not error and not text.strip():
            blank.append(number)
            continue
        values: list[str] = []
        if not error:
            values, error = _parse_line(text)
        if not error and len(values) != len(header):
            error = f"{len(values)} fields, the header has {len(header)} ({','.join(header)})"
        if error:
            first = values[0] if values else text.split(",", 1)[0]
            rows.append(_broken_row(path, number, error, first.strip().strip('"')))
            continue
        record = dict(zip(header, values))
        fps, fps_error = _parse_fps(record.get("fps"))
        overrides, override_error = _parse_overrides(
            {key: _csv_value(record[key]) for key in OVERRIDE_KEYS if key in record and record[key].strip()}
        )
        rows.append(
            Row(
                videoid=(record.get("videoid") or "").strip(),
                image=_resolve(record.get("image") or "", path.parent),
                audio=_resolve(record.get("audio") or "", path.parent),
                prompt=(record.get("prompt") or "").strip(),
                fps=fps,
                line=number,
                overrides=overrides,
                source=str(path),
                error="; ".join(e for e in (fps_error, override_error) if e),
            )
        )
    return Manifest(rows, str(path), len(lines), [header_at + 1], blank)


def _csv_value(text: str):
    """A CSV cell of an override column: an integer when it reads as one (``seed``/``steps``), else the text."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return text


def _parse_fps(value) -> tuple[float, str]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float(FPS), ""
    try:
        return float(value), ""
    except (TypeError, ValueError):
        return float("nan"), f"fps {value!r} is not a number (the official model needs {FPS})"


def _read_jsonl(lines: list[tuple[str, str]], path: Path) -> Manifest:
    known = set(JSON_KEYS)
    rows, blank = [], []
    for number, (raw, error) in enumerate(lines, start=1):
        if not error and not raw.strip():
            blank.append(number)
            continue
        if error:
            rows.append(_broken_row(path, number, error))
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            rows.append(_broken_row(path, number, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(record, dict):
            rows.append(_broken_row(path, number, f"expected a JSON object, got {type(record).__name__}"))
            continue
        errors = []
        unknown = sorted(set(record) - known)
        if unknown:
            errors.append(f"unknown key(s) {', '.join(unknown)}; valid keys: {_valid_names()}, and speakers")
        nulls = [key for key in JSON_KEYS if key in record and record[key] is None]
        if nulls:
            errors.append(f"{', '.join(nulls)} is null; give a value or leave the key out")
        for key in STRING_KEYS:
            if key in record and record[key] is not None and not isinstance(record[key], str):
                errors.append(f"{key} must be a string, got {type(record[key]).__name__}")
            elif isinstance(record.get(key), str) and _stray_byte(record[key]):
                errors.append(f"{key}: {_stray_byte(record[key])} of the decoded string")
        record = {key: value for key, value in record.items() if value is not None}
        overrides, override_error = _parse_overrides(record)
        if override_error:
            errors.append(override_error)
        fps, fps_error = _parse_fps(record.get("fps"))
        if fps_error:
            errors.append(fps_error)
        audio = "" if errors else _resolve(str(record.get("audio") or ""), path.parent)
        speakers = None
        if record.get("speakers") is not None and not errors:
            speakers, speakers_error = _parse_speakers(record["speakers"], audio, path, number)
            if speakers_error:
                errors.append(speakers_error)
            elif speakers.turns:
                audio = speakers.shared_audio
        rows.append(
            Row(
                videoid=str(record.get("videoid", "")).strip(),
                image="" if errors else _resolve(str(record.get("image") or ""), path.parent),
                audio=audio,
                speakers=speakers,
                prompt=str(record.get("prompt") or "").strip(),
                fps=fps,
                line=number,
                overrides=overrides,
                source=str(path),
                error="; ".join(errors),
            )
        )
    return Manifest(rows, str(path), len(lines), [], blank)


def _parse_speakers(value, audio: str, path: Path, line: int):
    """A row's ``speakers``: a JSON file (relative to the manifest's folder) or the list/object inline; ``(spec,
    "")`` or ``(None, error)``."""
    from avatar.io.speakers import parse_speakers, read_speakers

    try:
        if isinstance(value, str):
            return read_speakers(_resolve(value, path.parent), shared_audio=audio or None), ""
        return parse_speakers(value, f"{path} line {line}", path.parent, shared_audio=audio or None), ""
    except InputError as err:
        return None, str(err)


def _broken_row(path: Path, line: int, error: str, videoid: str = "") -> Row:
    return Row(
        videoid=videoid, image="", audio="", prompt="", fps=float("nan"), line=line, source=str(path), error=error
    )


def _parse_overrides(record: dict) -> tuple[dict, str]:
    overrides = {}
    for key in ("seed", "steps"):
        if key in record:
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, int):
                return {}, f"{key} {value!r} must be an integer"
            if key == "steps" and value < 1:
                return {}, f"steps {value} must be at least 1"
            if key == "seed" and not 0 <= value <= SEED_MAX:
                return {}, f"seed {value} must be from 0 to {SEED_MAX} (2**63 - 2)"
            overrides[key] = value
    if "strategy" in record:
        if not isinstance(record["strategy"], str) or record["strategy"] not in Strategy.__members__:
            return {}, f"strategy {record['strategy']!r} is not valid; choose one of: {', '.join(Strategy)}"
        overrides["strategy"] = Strategy(record["strategy"])
    return overrides, ""


def row_problem(row: Row) -> str:
    """What is wrong with a row on its own (without opening its files), or ``""``."""
    if row.error:
        return row.error
    if not row.videoid:
        return "videoid is empty"
    if "/" in row.videoid or "\\" in row.videoid or row.videoid in (".", "..") or row.videoid.startswith("."):
        return f"videoid {row.videoid!r} must be a plain file name (it names <output_dir>/<videoid>.mp4)"
    if not row.image:
        return "image is empty"
    if not row.audio and row.speakers is None:
        return "audio is empty"
    if row.fps != FPS:
        return f"fps {row.fps:g} is not supported: the official model only works at {FPS} fps"
    return ""
