"""Manifests: official CSV with/without BOM, JSON Lines overrides, row validation, sharding, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avatar.io.errors import InputError
from avatar.pipeline.batch import BatchSummary, assign_rows, read_manifest, shard_rows, validate_rows

HEADER = "videoid,image,audio,prompt,fps\n"


def write_csv(folder: Path, body: str, bom: bool) -> Path:
    path = folder / "manifest.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (HEADER + body).encode())
    return path


def check_files_exist(row) -> None:
    for name in ("image", "audio"):
        if not Path(getattr(row, name)).is_file():
            raise InputError(f"{name} {getattr(row, name)} does not exist")


@pytest.mark.parametrize("bom", [True, False])
def test_official_csv_with_and_without_bom(tmp_path, bom):
    path = write_csv(tmp_path, "8,assets/image/1.png,/abs/2.WAV,A person sits by a campfire.,25\n", bom)
    (row,) = read_manifest(path)
    assert row.videoid == "8"
    assert row.image == str((tmp_path / "assets/image/1.png").resolve())
    assert row.audio == "/abs/2.WAV"
    assert row.prompt == "A person sits by a campfire."
    assert row.fps == 25 and row.line == 2 and row.overrides == {}


def test_jsonl_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [
        {
            "videoid": "a",
            "image": "i.png",
            "audio": "a.wav",
            "prompt": "hi",
            "seed": 7,
            "steps": 3,
            "strategy": "blend",
        },
        {"videoid": "b", "image": "i.png", "audio": "a.wav"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = read_manifest(path)
    assert a.overrides == {"seed": 7, "steps": 3, "strategy": "blend"}
    assert a.image == str(tmp_path / "i.png") and b.fps == 25 and b.overrides == {} and b.line == 2


def test_bad_rows_stop_names_first_line_and_skip_returns_all(tmp_path):
    (tmp_path / "p.png").write_bytes(b"x")
    (tmp_path / "s.wav").write_bytes(b"x")
    body = (
        "a,p.png,s.wav,ok,25\nb,missing.png,s.wav,x,25\nc,p.png,s.wav,x,30\na,p.png,s.wav,dup,25\nd,p.png,s.wav,x,25\n"
    )
    path = write_csv(tmp_path, body, bom=True)
    rows = read_manifest(path)
    with pytest.raises(InputError, match=r"manifest\.csv line 3: image .*missing\.png does not exist \(and 2 more"):
        validate_rows(rows, "stop", check_files_exist)
    good, bad = validate_rows(rows, "skip", check_files_exist)
    assert [r.videoid for r in good] == ["a", "d"]
    assert [(r.line, reason.split(" ")[0]) for r, reason in bad] == [(3, "image"), (4, "fps"), (5, "duplicate")]
    assert "only works at 25 fps" in bad[1][1]
    assert "first used on line 2" in bad[2][1]


def test_jsonl_unknown_key_and_bad_json_are_reported_with_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"videoid": "a", "image": "i", "audio": "a", "sed": 1}\n{not json\n{"videoid": "b", "image": "i", "audio": "a", "steps": 0}\n'
    )
    good, bad = validate_rows(read_manifest(path), "skip")
    assert good == []
    assert "unknown key(s) sed" in bad[0][1] and "seed, steps, strategy" in bad[0][1]
    assert bad[1][0].line == 2 and "not valid JSON" in bad[1][1]
    assert "steps 0 must be at least 1" in bad[2][1]


def test_missing_column_and_bad_on_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("videoid,image\n1,x\n")
    with pytest.raises(InputError, match="missing column.*audio"):
        read_manifest(path)
    with pytest.raises(InputError, match="batch.on_error='later'"):
        validate_rows([], "later")


def test_shards_partition_the_rows_deterministically(tmp_path):
    path = write_csv(tmp_path, "".join(f"v{i},i.png,a.wav,p,25\n" for i in range(11)), bom=False)
    rows = read_manifest(path)
    shards = [shard_rows(rows, i, 3) for i in range(3)]
    ids = [r.videoid for shard in shards for r in shard]
    assert sorted(ids) == sorted(r.videoid for r in rows) and len(ids) == len(set(ids))
    assert [len(s) for s in shards] == [4, 4, 3]
    assert shard_rows(rows, 1, 3) == shards[1]
    with pytest.raises(InputError, match="shard_index=3 must be in 0..2"):
        shard_rows(rows, 3, 3)
    groups = assign_rows(rows, 4)
    assert sum(len(g) for g in groups) == 11 and {r.videoid for g in groups for r in g} == {r.videoid for r in rows}


def test_summary_json_and_text():
    summary = BatchSummary()
    summary.add_done("a", "/o/a.mp4", 2.0)
    summary.add_done("b", "/o/b.mp4", 4.0)
    summary.add_skipped("c", "m.csv line 4: fps 30 is not supported", 4)
    summary.add_failed("d", "RuntimeError: boom")
    data = json.loads(summary.to_json())
    assert (data["num_done"], data["num_skipped"], data["num_failed"], data["seconds_per_row"]) == (2, 1, 1, 3.0)
    text = summary.format()
    assert text.startswith("batch: 2 done, 1 skipped, 1 failed") and "FAILED  d: RuntimeError: boom" in text
    assert not summary.ok


# --- issue 22: strict manifests --------------------------------------------------------------------------------------


def test_csv_unknown_column_is_refused_naming_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("videoid,image,audio,prompt,fps,colour\na,i.png,a.wav,hi,25,red\n")
    with pytest.raises(InputError) as err:
        read_manifest(path)
    message = str(err.value)
    assert "unknown column(s) 'colour'" in message and "line 1" in message
    assert "videoid, image, audio, prompt, fps" in message and "seed, steps, strategy" in message
    path.write_text("videoid,image,audio,audio\na,i.png,a.wav,b.wav\n")
    with pytest.raises(InputError, match="named twice: audio"):
        read_manifest(path)


def test_csv_seed_steps_strategy_columns_are_per_row_overrides(tmp_path):
    """An extra ``seed`` column used to be dropped silently (the row rendered with the command's seed)."""
    path = tmp_path / "m.csv"
    path.write_text("videoid,image,audio,prompt,fps,seed,steps,strategy\na,i,a,p,25,7,3,blend\nb,i,a,p,25,,,\n")
    a, b = read_manifest(path)
    assert a.overrides == {"seed": 7, "steps": 3, "strategy": "blend"} and not a.error
    assert b.overrides == {} and not b.error
    path.write_text("videoid,image,audio,seed\na,i,a,seven\n")
    (row,) = read_manifest(path)
    assert "seed 'seven' must be an integer" in row.error


@pytest.mark.parametrize("key", ["videoid", "image", "audio", "prompt", "fps", "seed"])
def test_jsonl_null_is_refused(tmp_path, key):
    record = {"videoid": "a", "image": "i.png", "audio": "a.wav", "prompt": "p", key: None}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (row,) = read_manifest(path)
    assert f"{key} is null; give a value or leave the key out" in row.error
    assert row.videoid != "None"


def test_jsonl_rows_with_speakers_inline_from_a_file_or_with_turns(tmp_path):
    (tmp_path / "two.json").write_text(
        json.dumps([{"audio": "a.wav", "face": "auto"}, {"audio": "b.wav", "face": "auto"}])
    )
    rows = [
        {"videoid": "inline", "image": "p.jpg", "speakers": [{"audio": "a.wav", "face": [0, 0, 9, 9], "name": "Ann"}]},
        {"videoid": "file", "image": "p.jpg", "speakers": "two.json"},
        {"videoid": "turns", "image": "p.jpg", "audio": "both.wav", "speakers": [{"face": "auto", "turns": [[0, 1]]}]},
        {"videoid": "both", "image": "p.jpg", "audio": "x.wav", "speakers": "two.json"},
        {"videoid": "bad", "image": "p.jpg", "speakers": [{"audio": "a.wav", "face": "left"}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    inline, from_file, turns, both, bad = read_manifest(path)
    assert inline.error == "" and inline.audio == "" and inline.speakers.speakers[0].name == "Ann"
    assert inline.speakers.speakers[0].audio == str(tmp_path / "a.wav")
    assert from_file.error == "" and len(from_file.speakers) == 2
    assert turns.error == "" and turns.speakers.turns and turns.audio == str(tmp_path / "both.wav")
    assert "a shared recording is given" in both.error
    assert 'speaker 1 ("speaker 1") face' in bad.error and f"{path} line 5" in bad.error
    good, refused = validate_rows([inline, from_file, turns, both, bad], "skip")
    assert [r.videoid for r in good] == ["inline", "file", "turns"] and len(refused) == 2
