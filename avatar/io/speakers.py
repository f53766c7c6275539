"""The several-speakers input contract (``speakers=PATH.json``, a batch row's ``speakers``, the API's
``speakers=[...]``), read strictly: every problem is one ``InputError`` line naming the source, the speaker and the
field. What is rendered from it (faces, masks, turns, the mix) is ``avatar/pipeline/speakers.py``; the contract and
its rules: ``docs/speakers.md``.

- a list ``[{"audio": "a.wav", "face": "auto" | [x0, y0, x1, y1], "name": "Ann"}, ...]``: one track per speaker;
- an object ``{"audio": "both.wav", "speakers": [{"face": ..., "turns": [[start_s, end_s], ...], "name": ...}]}``:
  one shared recording with per-speaker turns (``audio=PATH`` may give the recording instead, with the list form).

Relative paths are relative to the JSON file's folder (``base_dir`` for data given inline).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from avatar.io.errors import InputError

Box = tuple[float, float, float, float]

#: Keys of one speaker object and of the top-level object form.
SPEAKER_KEYS = ("audio", "face", "name", "turns")
TOP_KEYS = ("audio", "speakers")


@dataclass(frozen=True)
class Speaker:
    """One speaker: ``index`` (0-based, in file order), ``name``, its own ``audio`` track (None with turns),
    ``face`` (``"auto"`` or a box in input-image pixels) and ``turns`` (seconds, None without)."""

    index: int
    name: str
    face: str | Box
    audio: str | None = None
    turns: tuple[tuple[float, float], ...] | None = None

    @property
    def label(self) -> str:
        """How error messages name the speaker: ``speaker 2 ("Bob")``."""
        return f'speaker {self.index + 1} ("{self.name}")'


@dataclass(frozen=True)
class SpeakerSpec:
    """The validated contents of ``speakers=`` (``source`` names it in messages: the file, ``speakers`` of a batch
    row, the API argument)."""

    source: str
    speakers: tuple[Speaker, ...]
    shared_audio: str | None = None

    @property
    def turns(self) -> bool:
        """One shared recording with per-speaker turns (time-switched masks)."""
        return self.shared_audio is not None

    @property
    def tracks(self) -> list[str]:
        """The audio files to decode, in order: the shared recording, or one per speaker."""
        return [self.shared_audio] if self.turns else [s.audio for s in self.speakers]

    def audio_files(self) -> dict[str, str]:
        """Label → path of every audio file: ``audio`` (the shared recording) or ``audio (speaker i ("name"))``."""
        if self.turns:
            return {"audio": self.shared_audio}
        return {f"audio ({s.label})": s.audio for s in self.speakers}

    def __len__(self) -> int:
        return len(self.speakers)

    def as_dict(self) -> dict:
        """Plain data (absolute paths): what the resume key and the report record."""
        out: dict = {
            "speakers": [
                {
                    "name": s.name,
                    "face": s.face if isinstance(s.face, str) else list(s.face),
                    **({"audio": s.audio} if s.audio is not None else {}),
                    **({"turns": [list(t) for t in s.turns]} if s.turns is not None else {}),
                }
                for s in self.speakers
            ]
        }
        if self.shared_audio is not None:
            out["audio"] = self.shared_audio
        return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _path(value, base: Path) -> str:
    return os.path.abspath(value if os.path.isabs(value) else base / value)


def parse_speakers(data, source: str, base_dir: str | Path = ".", shared_audio: str | None = None) -> SpeakerSpec:
    """Validate plain data (the JSON's contents, an API list or a batch row's value) into a ``SpeakerSpec``; every
    problem is one ``InputError`` line naming ``source``, the speaker and the field. ``shared_audio``: the recording
    of ``audio=`` (turns given in the list form)."""
    base = Path(base_dir)
    where = f"speakers={source}"
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(TOP_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r}; the object form has 'audio' and 'speakers'")
        if "speakers" not in data:
            raise InputError(f"{where}: the object form needs 'speakers': a list of speaker objects")
        top_audio = data.get("audio")
        if top_audio is not None:
            if shared_audio is not None:
                raise InputError(f"{where}: 'audio' is given both in the file and as audio=; give it once")
            if not isinstance(top_audio, str) or not top_audio:
                raise InputError(f"{where}: 'audio' must be the path of the shared recording, got {top_audio!r}")
            shared_audio = _path(top_audio, base)
        entries = data["speakers"]
    else:
        entries = data
    if not isinstance(entries, list):
        raise InputError(
            f'{where}: expected a list of speakers [{{"audio": ..., "face": ...}}, ...], got {type(entries).__name__}'
        )
    if not entries:
        raise InputError(f"{where}: the list of speakers is empty; give at least one speaker")
    speakers = [_parse_speaker(entry, i, where, base) for i, entry in enumerate(entries)]
    with_turns = [s for s in speakers if s.turns is not None]
    with_audio = [s for s in speakers if s.audio is not None]
    if shared_audio is not None or with_turns:
        if shared_audio is None:
            raise InputError(
                f'{where}: {with_turns[0].label} turns: turns need one shared recording: give "audio" at the top of '
                'the file ({"audio": ..., "speakers": [...]}) or audio=PATH'
            )
        if with_audio:
            raise InputError(
                f'{where}: {with_audio[0].label} audio: a shared recording is given (the file\'s "audio" or audio=), so '
                "the speakers take turns of it, not tracks; drop this speaker's audio or the shared recording"
            )
        missing = [s for s in speakers if s.turns is None]
        if missing:
            raise InputError(
                f"{where}: {missing[0].label} turns: missing; with a shared recording every speaker needs turns"
            )
    else:
        missing = [s for s in speakers if s.audio is None]
        if missing:
            raise InputError(f"{where}: {missing[0].label} audio: missing; give the path of this speaker's track")
    names: dict[str, Speaker] = {}
    for s in speakers:
        if s.name in names:
            raise InputError(f"{where}: {s.label} name: {names[s.name].label} has the same name; names must differ")
        names[s.name] = s
    return SpeakerSpec(source=source, speakers=tuple(speakers), shared_audio=shared_audio)


def _parse_speaker(entry, index: int, where: str, base: Path) -> Speaker:
    label = f"speaker {index + 1}"
    if not isinstance(entry, dict):
        raise InputError(f'{where}: {label}: expected an object {{"audio": ..., "face": ...}}, got {entry!r}')
    name = entry.get("name", f"speaker {index + 1}")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: {label} name: {name!r} must be a non-empty string")
    label = f'speaker {index + 1} ("{name}")'
    unknown = sorted(set(entry) - set(SPEAKER_KEYS))
    if unknown:
        raise InputError(f"{where}: {label} {unknown[0]}: unknown field; valid fields are {', '.join(SPEAKER_KEYS)}")
    audio = entry.get("audio")
    if audio is not None:
        if not isinstance(audio, str) or not audio:
            raise InputError(f"{where}: {label} audio: {audio!r} must be the path of a speech file")
        audio = _path(audio, base)
    if "face" not in entry:
        raise InputError(f'{where}: {label} face: missing; give "auto" or [x0, y0, x1, y1] in pixels of the image')
    face = entry["face"]
    if isinstance(face, str):
        if face != "auto":
            raise InputError(
                f'{where}: {label} face: {face!r}; give "auto" or [x0, y0, x1, y1] in pixels of the image'
            )
    else:
        if not isinstance(face, list) or len(face) != 4 or not all(_number(v) for v in face):
            raise InputError(
                f'{where}: {label} face: {face!r}; give "auto" or four numbers [x0, y0, x1, y1] in pixels of the image'
            )
        x0, y0, x1, y1 = (float(v) for v in face)
        if not (x0 < x1 and y0 < y1):
            raise InputError(f"{where}: {label} face: {face} is empty; a box needs x0 < x1 and y0 < y1")
        face = (x0, y0, x1, y1)
    turns = entry.get("turns")
    if turns is not None:
        if not isinstance(turns, list) or not turns:
            raise InputError(f"{where}: {label} turns: {turns!r}; give a non-empty list [[start_s, end_s], ...]")
        parsed = []
        for turn in turns:
            if not isinstance(turn, list) or len(turn) != 2 or not all(_number(v) for v in turn):
                raise InputError(f"{where}: {label} turns: {turn!r} is not a pair [start_s, end_s] of seconds")
            start, end = float(turn[0]), float(turn[1])
            if not 0 <= start < end:
                raise InputError(f"{where}: {label} turns: {turn} needs 0 <= start < end (seconds)")
            parsed.append((start, end))
        turns = tuple(sorted(parsed))
    return Speaker(index=index, name=name, face=face, audio=audio, turns=turns)


def _refuse_constant(constant):
    raise ValueError(f"{constant} is not valid JSON")


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN`` and ``Infinity`` (``ValueError``, as for any other invalid JSON)."""
    return json.loads(text, parse_constant=_refuse_constant)


def read_speakers(path, shared_audio: str | None = None) -> SpeakerSpec:
    """Read and validate ``speakers=PATH.json`` (strict JSON: no comments, no trailing commas, no NaN)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"speakers={path}: file not found; give a JSON file listing the speakers")
    try:
        with open(path, encoding="utf-8") as handle:
            data = strict_json(handle.read())
    except UnicodeDecodeError as err:
        raise InputError(f"speakers={path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise InputError(
            f"speakers={path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    except ValueError as err:
        raise InputError(f"speakers={path}: not valid JSON: {err}") from None
    shared = os.path.abspath(shared_audio) if shared_audio else None
    return parse_speakers(data, path, Path(path).resolve().parent, shared)
