"""Property-based tests (hypothesis) of the config and manifest readers (issue 22): any generated value either passes
``validate`` (and then renders on the tiny model to the end) or is refused with one ``InputError`` line (exit 2) —
never a traceback.

- ``test_any_config_value_passes_or_is_refused_in_one_line``: 350 examples of 1–4 ``key=value`` overrides drawn from
  the declarations in ``avatar/config.py`` (every key: in-range values, the bounds and one past them, wrong types,
  ``nan``/``inf``, huge numbers, Hydra syntax, unknown keys, broken paths), each through the real ``compose`` and
  ``validate`` in-process.
- ``test_any_manifest_passes_or_is_refused_in_one_line``: 150 CSV and JSON Lines manifests (good and broken rows, odd
  headers, extra columns, JSON values of every type, raw bytes) through ``read_manifest`` and ``validate``.
- ``test_valid_configs_render_to_the_end``: a few in-domain configs (the geometry of windows, tiles, overlaps,
  strategies, guidance) that pass ``validate`` render through ``launch.generate.main`` on the tiny model (64 px, one
  second, 1–2 steps), exit 0 and write the mp4.

500 examples through the readers and 4 renders per run, derandomized (the same examples on every run, so CI is
deterministic) and without deadlines; the whole file takes about two minutes of one core.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from avatar.compose import compose
from avatar.config import PathKind, Range
from avatar.io.errors import InputError
from avatar.validate import _field_type, declared_fields, validate
from tests.e2e.conftest import EXAMPLES

pytestmark = pytest.mark.slow

CONFIG_EXAMPLES = 350
MANIFEST_EXAMPLES = 150
RENDER_EXAMPLES = 4

COMMON = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)


# --- the files every example can point at ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, one_second_clip) -> dict[str, Path]:
    """Good and bad inputs in one folder (made once): the portrait and a second of speech, a text file, a folder, a
    FIFO, an empty file, a missing path; ``out/`` for outputs."""
    root = tmp_path_factory.mktemp("properties")
    shutil.copy(EXAMPLES / "portrait.jpg", root / "img.jpg")
    shutil.copy(one_second_clip, root / "a.wav")
    (root / "notes.txt").write_text("A woman speaks.\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "folder").mkdir()
    os.mkfifo(root / "pipe")
    (root / "out").mkdir()
    return {
        "root": root,
        "image": root / "img.jpg",
        "audio": root / "a.wav",
        "text": root / "notes.txt",
        "empty": root / "empty.txt",
        "folder": root / "folder",
        "fifo": root / "pipe",
        "missing": root / "missing.file",
        "out": root / "out",
    }


def _base(tiny_weights, files) -> list[str]:
    return [
        "model=tiny",
        f"weights={tiny_weights}",
        f"image={files['image']}",
        f"audio={files['audio']}",
        f"output={files['out'] / 'o.mp4'}",
        "sampling.steps=1",
        "model.image_size=64",
        "device=cpu",
    ]


def _refused_in_one_line(err: InputError) -> None:
    message = str(err)
    assert message.strip() and "\n" not in message and "Traceback" not in message, repr(message)


# --- values from the declarations --------------------------------------------------------------------------------

#: Override values that are wrong for most keys: other types, Hydra syntax, interpolations, empty.
JUNK = st.sampled_from(
    ["abc", "", "null", "true", "1.5", "-0", "1e400", "nan", "inf", "-inf", "[1,2]", "{a: 1}", "${oc.env:HOME}",
     "'quoted'", "0x10", "1_000", "  7  ", "\u0663", "None", "[]", "${model.hidden_size}"]
)  # fmt: skip

HUGE = st.sampled_from([2**31, 2**63, 2**64, -(2**63), 10**30])


def _number_text(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _bounds(declared: Range, integer: bool) -> list:
    """The bounds of a range and the values just past them."""
    out = []
    step = 1 if integer else 1e-9
    for bound in (declared.ge, declared.gt, declared.le):
        if bound is not None:
            out += [bound, bound - step, bound + step]
    if declared.multiple_of:
        out += [declared.multiple_of, declared.multiple_of + 1, 3 * declared.multiple_of]
    return [int(v) if integer else float(v) for v in out]


def _range_values(declared: Range, integer: bool, is_list: bool) -> st.SearchStrategy[str]:
    if integer:
        lo = declared.ge if declared.ge is not None else (declared.gt + 1 if declared.gt is not None else -10)
        hi = declared.le if declared.le is not None else int(lo) + 300
        inside = st.integers(int(lo), int(min(hi, int(lo) + 300)))
        near = st.sampled_from(_bounds(declared, True) or [0, -1, 1])
        number = st.one_of(inside, near, st.integers(-5, 5), HUGE)
    else:
        number = st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=64),
            st.floats(-2, 100),
            st.sampled_from(_bounds(declared, False) or [0.0, -1.0]),
        )
    text = number.map(_number_text)
    if is_list:
        items = st.lists(number, max_size=4).map(lambda v: "[" + ",".join(_number_text(x) for x in v) + "]")
        return st.one_of(items, text, JUNK)
    if declared.auto:
        return st.one_of(st.just("auto"), st.just("AUTO"), text, JUNK)
    return st.one_of(text, text, JUNK)


def _path_values(key: str, kind: PathKind, files: dict) -> st.SearchStrategy[str]:
    names = ["image", "audio", "text", "empty", "folder", "fifo", "missing", "out"]
    existing = st.sampled_from(names).map(lambda name: str(files[name]))
    odd = st.sampled_from(["", " ", "~", "/", "/dev/zero", "a" * 300, "x:y, z's ${HOME}", "../..", "é/中.mp4"])
    if kind is PathKind.output:
        out = files["out"]
        made = st.sampled_from(["o.mp4", "o.MP4", "o.avi", "sub/o.mp4", "n" * 240 + ".mp4", ".mp4", "o.mp4/"])
        return st.one_of(made.map(lambda name: str(out / name)), existing, odd)
    return st.one_of(existing, odd, st.text(max_size=12))


def _enum_values(enum: type[Enum]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([m.value for m in enum]), JUNK, st.text(string.ascii_letters, max_size=6))


def value_strategy(key: str, f, hint, files: dict) -> st.SearchStrategy[str]:
    """Override values for ``key``, mostly around its declared domain."""
    base, optional, is_list = _field_type(hint)
    declared = f.metadata.get("range") or f.metadata.get("path")
    if isinstance(declared, PathKind):
        values = _path_values(key, declared, files)
    elif isinstance(declared, Range):
        values = _range_values(declared, base is int or declared.auto, is_list)
    elif isinstance(base, type) and issubclass(base, Enum):
        values = _enum_values(base)
    elif base is bool:
        values = st.one_of(st.sampled_from(["true", "false", "True", "0", "1"]), JUNK)
    else:
        values = st.one_of(st.text(max_size=40), JUNK)
    return st.one_of(values, st.just("null")) if optional else values


#: Keys whose change makes ``validate`` build the full-size model on the meta device: drawn rarely elsewhere.
SLOW_KEYS = ("weights",)


@st.composite
def overrides(draw, files: dict) -> list[str]:
    fields = [(k, f, h) for k, f, h in declared_fields() if k not in SLOW_KEYS]
    model = st.sampled_from([x for x in fields if x[0].startswith("model.")])
    other = st.sampled_from([x for x in fields if not x[0].startswith("model.")])
    # model.* is 40 % of the keys; an in-range value there costs a weights verification: drawn a third of the time
    key = st.one_of(model, other, other)
    chosen = draw(st.lists(key, min_size=1, max_size=4, unique_by=lambda x: x[0]))
    args = [f"{key}={draw(value_strategy(key, f, hint, files))}" for key, f, hint in chosen]
    extra = draw(
        st.sampled_from(
            [None] * 12
            + ["sampling.stepz=3", "model.motion_exp=1", "novalue", "=5", "sampling=fast", "memory=low", "memory=none"]
            + ["parallel=single", "parallel=sp", "model=hunyuan_avatar", f"weights={files['folder']}", "+x=1"]
        )
    )
    return args + ([extra] if extra else [])


# --- the properties ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_any_config_value_passes_or_is_refused_in_one_line(tiny_weights, files):
    outcomes = {"passed": 0, "refused": 0}

    @settings(COMMON, max_examples=CONFIG_EXAMPLES)
    @given(args=overrides(files))
    def check(args):
        try:
            cfg = compose(_base(tiny_weights, files) + args)
            validated = validate(cfg)
        except InputError as err:
            _refused_in_one_line(err)
            outcomes["refused"] += 1
            return
        assert validated.jobs and validated.plan is not None
        outcomes["passed"] += 1

    check()
    assert sum(outcomes.values()) >= CONFIG_EXAMPLES
    assert outcomes["passed"] >= 20 and outcomes["refused"] >= 150, outcomes  # both sides are exercised


# --- manifests ---------------------------------------------------------------------------------------------------

CELL = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["img.jpg", "a.wav", "notes.txt", "missing.file", "folder", "pipe", "", " ", "~", "a,b", '"q"']),
)
JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=5,
)
COLUMNS = ["videoid", "image", "audio", "prompt", "fps"]


@st.composite
def csv_manifest(draw) -> bytes:
    header = draw(
        st.one_of(
            st.just(COLUMNS),
            st.just(COLUMNS[:3]),
            st.just([*COLUMNS, "seed"]),
            st.permutations(COLUMNS),
            st.lists(st.sampled_from([*COLUMNS, "seed", "x", ""]), max_size=6),
        )
    )
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            prompt = draw(st.sampled_from(["hi", "", '"a, b"']))
            lines.append(f"r{draw(st.integers(0, 3))},img.jpg,a.wav,{prompt},25")
        else:
            cells = draw(st.lists(CELL, min_size=0, max_size=7))
            lines.append(",".join(cells))
        if draw(st.integers(0, 5)) == 0:
            lines.append("")
    text = "\r\n".join(lines) if draw(st.booleans()) else "\n".join(lines)
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 6)) == 0:
        data += draw(st.binary(max_size=16))
    return data


@st.composite
def jsonl_manifest(draw) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 3))):
        row: dict = {}
        if draw(st.booleans()):
            row = {"videoid": f"r{draw(st.integers(0, 3))}", "image": "img.jpg", "audio": "a.wav", "prompt": "hi"}
        for key in draw(st.lists(st.sampled_from([*COLUMNS, "seed", "steps", "strategy", "extra"]), max_size=4)):
            row[key] = draw(st.one_of(JSON_VALUE, CELL, st.sampled_from([1, 0, -1, 2**64, 1.5, "shift", "blend"])))
        line = json.dumps(row) if draw(st.integers(0, 5)) else draw(st.sampled_from(["[1]", "{", "null", "1", '"x"']))
        lines.append(line)
    data = "\n".join(lines).encode("utf-8")
    if draw(st.integers(0, 6)) == 0:
        data += draw(st.binary(max_size=16))
    return data


@pytest.mark.timeout(600)
def test_any_manifest_passes_or_is_refused_in_one_line(tiny_weights, files):
    import dataclasses

    composed = {}  # the config is composed once per on_error (the config reader has its own property above)
    for on_error in ("stop", "skip"):
        composed[on_error] = compose(
            ["model=tiny", f"weights={tiny_weights}", "sampling.steps=1", "model.image_size=64", "device=cpu"]
            + [f"batch={files['root'] / 'rows.csv'}", f"output_dir={files['root'] / 'batch'}"]
            + [f"batch.on_error={on_error}"]
        )
    outcomes = {"passed": 0, "refused": 0}
    counter = iter(range(10**9))

    @settings(COMMON, max_examples=MANIFEST_EXAMPLES)
    @given(data=st.one_of(csv_manifest(), jsonl_manifest()), suffix=st.sampled_from([".csv", ".jsonl"]),
           on_error=st.sampled_from(["stop", "skip"]))  # fmt: skip
    def check(data, suffix, on_error):
        n = next(counter)
        manifest = files["root"] / f"m{n}{suffix}"
        manifest.write_bytes(data)
        out_dir = files["root"] / f"batch{n}"
        cfg = composed[on_error]
        cfg = dataclasses.replace(
            cfg, output_dir=str(out_dir), batch=dataclasses.replace(cfg.batch, manifest=str(manifest))
        )
        try:
            validated = validate(cfg)
        except InputError as err:
            _refused_in_one_line(err)
            outcomes["refused"] += 1
            return
        finally:
            manifest.unlink()
        assert not out_dir.exists()  # validation creates nothing
        for row, problem in validated.bad:  # with on_error=skip: each refused row has its one-line reason
            assert problem.strip() and "\n" not in problem, (row, problem)
        outcomes["passed"] += 1

    check()
    assert outcomes["passed"] >= 10 and outcomes["refused"] >= 30, outcomes


# --- passing configs render to the end ---------------------------------------------------------------------------


@st.composite
def renderable(draw) -> list[str]:
    """In-domain values of the settings that shape a render (window geometry, tiles, overlaps, strategies,
    guidance, encoding), with the tiny model's sizes kept: these pass ``validate`` unless a rule between fields
    refuses the combination. Sizes that multiply the work (1-token chunks, 4-frame or 8-pixel tile strides) are left
    out to keep each render to seconds."""
    window = draw(st.sampled_from([9, 13, 17, 33]))
    tile = draw(st.sampled_from([8, 16, 32]))
    size = draw(st.sampled_from([64, 128]))
    latents = (window - 1) // 4 + 1
    args = {
        "sampling.steps": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**63 - 2)),
        "model.window_frames": window,
        "model.shift_offset": draw(st.integers(0, latents)),
        "long.strategy": draw(st.sampled_from(["auto", "shift", "blend", "segments"])),
        "long.overlap_frames": draw(st.integers(0, latents - 1)),
        "model.vae_tile_frames": tile,
        "model.vae_tile_stride_frames": draw(st.sampled_from([s for s in (8, 12, 16, 24, 32) if s <= tile])),
        "model.vae_tile_size": size,
        "model.vae_tile_stride": draw(st.sampled_from([s for s in (32, 48, 64, 96, 128) if s <= size])),
        "sampling.cfg_scale": draw(st.floats(0, 12)),
        "sampling.shift": draw(st.floats(0.1, 12)),
        "sampling.joint_cfg_steps": draw(st.integers(0, 3)),
        "sampling.joint_face_mask_scale": draw(st.floats(0, 2)),
        "sampling.motion_exp": draw(st.floats(0, 100)),
        "sampling.motion_pose": draw(st.floats(0, 100)),
        "sampling.audio_cfg_max": draw(st.floats(0, 10)),
        "sampling.audio_cfg_min": draw(st.floats(0, 10)),
        "sampling.joint_cfg_floor": draw(st.floats(0, 10)),
        "sampling.reference_sample": draw(st.booleans()),
        "model.text_len": draw(st.integers(1, 64)),
        "sampling.cache": draw(st.sampled_from(["official", "adaptive", "off"])),
        "sampling.fidelity": draw(st.sampled_from(["official", "fp32"])),
        "audio.context_seconds": draw(st.floats(0, 14)),
        "memory.token_chunk": draw(st.sampled_from([0, 64, 8192])),
        "output.crf": draw(st.integers(0, 51)),
        "output.preset": draw(st.sampled_from(["ultrafast", "fast", "medium"])),
        "checkpoint_every": draw(st.integers(0, 2)),
    }
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()]


@pytest.mark.timeout(900)
def test_valid_configs_render_to_the_end(tiny_weights, files, capsys):
    from launch import generate
    from tests.utils.video import read_frames

    rendered = []
    counter = iter(range(10**9))

    @settings(COMMON, max_examples=RENDER_EXAMPLES)
    @given(args=renderable())
    def check(args):
        out = files["out"] / f"r{next(counter)}.mp4"
        argv = [a for a in _base(tiny_weights, files) if not a.startswith(("output=", "sampling.steps="))]
        argv += [f"output={out}", *args]
        try:
            validate(compose(argv))
        except InputError as err:
            _refused_in_one_line(err)
            assume(False)  # a rule between fields refused the combination: not one of the renders
        capsys.readouterr()
        code = generate.main(argv)
        err = capsys.readouterr().err
        assert code == 0 and "Traceback" not in err, err[-4000:]
        frames = read_frames(out)
        assert len(frames) == 25 and frames.shape[1:3] == (64, 64)
        assert not math.isnan(float(frames.mean()))
        rendered.append(args)

    check()
    assert len(rendered) == RENDER_EXAMPLES
