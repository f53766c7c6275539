"""No-clobber publishing, stale temporaries, ffmpeg paths that are never protocols, and the strict manifest reader
(issue 13)."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import soundfile as sf

from avatar.io.atomic import HOST, atomic_write_json, conflict_name, publish, remove_stale_temps, temp_name
from avatar.io.manifest import read_manifest
from avatar.io.video import VideoWriter, ffmpeg_exe
from avatar.pipeline.batch import BatchSummary, validate_rows


def test_publish_never_replaces_what_appeared(tmp_path):
    target = tmp_path / "out.mp4"
    first = tmp_path / "a.tmp"
    first.write_bytes(b"first")
    assert publish(first, target) == str(target)
    second = tmp_path / "b.tmp"
    second.write_bytes(b"second")
    kept_as = publish(second, target)
    assert kept_as == conflict_name(str(target)) and kept_as.endswith(".mp4") and ".conflict-" in kept_as
    assert target.read_bytes() == b"first" and open(kept_as, "rb").read() == b"second"
    assert not first.exists() and not second.exists()
    third = tmp_path / "c.tmp"
    third.write_bytes(b"third")
    assert publish(third, target, replace=True) == str(target) and target.read_bytes() == b"third"


def test_report_never_replaces_what_appeared(tmp_path):
    target = tmp_path / "out.mp4.json"
    target.write_text("theirs")
    where = atomic_write_json(target, {"ours": 1}, replace=False)
    assert target.read_text() == "theirs" and json.loads(open(where).read()) == {"ours": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, os.path.basename(where)])


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out.mp4"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.mp4.{HOST}-{dead.pid}-0123abcd.video.mp4"
    alive = tmp_path / f".out.mp4.{HOST}-1-0123abcd.mux.mp4"  # pid 1 runs
    other = tmp_path / f".other.mp4.{HOST}-{dead.pid}-0123abcd.video.mp4"
    mine = temp_name(out, "video.mp4")
    for path in (stale, alive, other, mine):
        open(path, "wb").close()
    assert remove_stale_temps(out) == [str(stale)]
    assert alive.exists() and other.exists() and os.path.exists(mine)


def _tone(path, freq, seconds=0.4, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32) if freq else np.zeros_like(t), rate)


def _audio_rms(path) -> float:
    out = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "pipe:1"], capture_output=True
    ).stdout
    return float(np.sqrt(np.mean(np.frombuffer(out, "<f4") ** 2)))


@pytest.mark.parametrize("name", ["file:x.wav", "take:1.wav", "-x.wav"])
def test_mux_reads_the_file_named_never_a_protocol(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    _tone(tmp_path / name, 440)  # the file the user named: a tone
    _tone(tmp_path / "x.wav", 0)  # what `file:` as a protocol would read: silence
    with VideoWriter("v.mp4", 25, 64, 64, audio_path=name, preset="ultrafast") as writer:
        writer.write(np.zeros((8, 64, 64, 3), np.uint8))
    assert _audio_rms(tmp_path / "v.mp4") > 0.1


def test_unterminated_quote_never_swallows_the_next_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text(
        'videoid,image,audio,prompt,fps\na,i.jpg,a.wav,"open,25\n\nb,i.jpg,b.wav,"ok, fine",25\nc,i.jpg,c.wav,x,25\n"'
    )
    rows = read_manifest(path)
    assert [(r.line, r.videoid) for r in rows] == [(2, "a"), (4, "b"), (5, "c"), (6, "")]
    assert "unterminated quote" in rows[0].error and rows[1].prompt == "ok, fine" and not rows[2].error
    good, bad = validate_rows(rows, "skip")
    summary = BatchSummary()
    summary.add_bad_rows(bad)
    summary.add_done("b", "b.mp4", 1.0)
    summary.account(rows, rows)
    data = json.loads(summary.to_json())
    lines = {e["line"] for e in data["done"] + data["skipped"] + data["failed"]}
    lines |= set(data["lines"]["header"]) | set(data["lines"]["blank"])
    assert lines == set(range(1, rows.num_lines + 1))  # every line accounted for
    assert [e["line"] for e in data["failed"]] == [5]  # c had no result
