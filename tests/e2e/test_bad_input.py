"""Every bad input ends before any model is built: one-line error naming the file or value, exit code 2, nothing at
the output path. Runs `launch.generate.main` in-process (one subprocess case checks the real exit status)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image

from avatar.io.errors import InputError
from launch import generate
from tests.e2e.conftest import EXAMPLES, ROOT, tiny_args
from tests.e2e.conftest import generate as run_generate


@pytest.fixture
def built(monkeypatch):
    """Fails the test if any model class gets built."""
    import avatar.pipeline.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built for bad input")

    monkeypatch.setattr(run, "Renderer", refuse)


def _run(capsys, args):
    code = generate.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if line.startswith("error:")]


def _write_wav(path, samples: np.ndarray, rate: int = 16000):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).astype("<i2").tobytes())


def _check(capsys, tmp_path, tiny_weights, expect: str, *, image=None, audio=None, output=None, extra=()):
    out = output or tmp_path / "out.mp4"
    args = tiny_args(tiny_weights, out, audio, *extra)
    if image is not None:
        args = [a for a in args if not a.startswith("image=")] + [f"image={image}"]
    code, errors = _run(capsys, args)
    assert code == 2
    assert len(errors) == 1, errors
    assert expect in errors[0], errors[0]
    assert not out.exists()
    assert not list(tmp_path.glob("*.mp4*"))
    return errors[0]


def test_missing_image(capsys, tmp_path, tiny_weights, built):
    msg = _check(capsys, tmp_path, tiny_weights, "nothere.jpg", image=tmp_path / "nothere.jpg")
    assert "not" in msg.lower() or "missing" in msg.lower()


def test_not_an_image(capsys, tmp_path, tiny_weights, built):
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text, not a picture")
    _check(capsys, tmp_path, tiny_weights, "fake.jpg", image=fake)


def test_image_too_small(capsys, tmp_path, tiny_weights, built):
    small = tmp_path / "small.png"
    Image.new("RGB", (48, 200), "red").save(small)
    msg = _check(capsys, tmp_path, tiny_weights, "small.png", image=small)
    assert "64" in msg


def test_missing_audio(capsys, tmp_path, tiny_weights, built):
    _check(capsys, tmp_path, tiny_weights, "nothere.wav", audio=tmp_path / "nothere.wav")


def test_not_audio(capsys, tmp_path, tiny_weights, built):
    fake = tmp_path / "fake.wav"
    shutil.copy(EXAMPLES / "portrait.jpg", fake)
    _check(capsys, tmp_path, tiny_weights, "fake.wav", audio=fake)


def test_empty_audio(capsys, tmp_path, tiny_weights, built):
    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros(0, dtype=np.float32))
    _check(capsys, tmp_path, tiny_weights, "empty.wav", audio=empty)


def test_audio_too_long(capsys, tmp_path, tiny_weights, built):
    msg = _check(capsys, tmp_path, tiny_weights, "speech_5s.wav", extra=("audio.max_seconds=2",))
    assert "2" in msg


def test_unknown_model(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["model=huge"])
    assert code == 2 and "model" in errors[0] and "tiny" in errors[0]


def test_weights_missing(capsys, tmp_path, tiny_weights, built):
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("weights=")]
    code, errors = _run(capsys, args + [f"weights={tmp_path / 'noweights'}"])
    assert code == 2 and "noweights" in errors[0]


def test_weights_not_matching(capsys, tmp_path, tiny_weights, built):
    # the tiny folder does not hold the full-size model
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("model=")]
    code, errors = _run(capsys, ["model=hunyuan_avatar", *args])
    assert code == 2 and "not model=hunyuan_avatar" in errors[0] and "add model=tiny" in errors[0]
    assert not (tmp_path / "o.mp4").exists()


def test_output_folder_missing(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / "no" / "such" / "dir" / "o.mp4"
    _check(capsys, tmp_path, tiny_weights, "no/such/dir", output=out)


def test_output_not_writable(capsys, tmp_path, tiny_weights, built):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("running as root: a read-only folder is still writable here")
        except PermissionError:
            pass
        _check(capsys, tmp_path, tiny_weights, "ro", output=folder / "o.mp4")
    finally:
        folder.chmod(0o700)


def test_existing_output_not_overwritten(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    code, errors = _run(capsys, tiny_args(tiny_weights, out))
    assert code == 2 and "overwrite=true" in errors[0]
    assert out.read_bytes() == b"keep me"


def test_steps_below_one(capsys, tmp_path, tiny_weights, built):
    _check(capsys, tmp_path, tiny_weights, "steps", extra=("sampling.steps=0",))


def test_config_typo_and_type(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["sampling.stepz=3"])
    assert code == 2 and "sampling.stepz" in errors[0]
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["seed=abc"])
    assert code == 2 and "seed" in errors[0]


@pytest.mark.timeout(120)
def test_exit_status_of_the_real_process(tmp_path, tiny_weights):
    out = tmp_path / "o.mp4"
    proc = run_generate(*tiny_args(tiny_weights, out, tmp_path / "missing.wav"))
    assert proc.returncode == 2, proc.stderr
    assert "missing.wav" in proc.stderr
    assert not out.exists()


def test_invalid_parallel_plan(capsys, tmp_path, tiny_weights, built):
    code, errors = _run(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["parallel.ulysses=2"])
    assert code == 2 and "ulysses" in errors[0] and "world" in errors[0] and "4" in errors[0]
    assert not (tmp_path / "o.mp4").exists()


# --- issue 13: every bad input refused before any model, in one line, creating nothing ---------------------------


def _one_line(capsys, args, expect, created=()):
    code = generate.main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in expect:
        assert word in errors[0], errors[0]
    for path in created:
        assert not path.exists(), path
    return errors[0]


def _manifest(tmp_path, body: bytes, name="rows.csv"):
    path = tmp_path / name
    path.write_bytes(b"videoid,image,audio,prompt,fps\n" + body)
    return path


def _batch_args(tiny_weights, manifest, out_dir, *extra):
    return ["model=tiny", f"weights={tiny_weights}", f"batch={manifest}", f"output_dir={out_dir}", *extra]


SEED_TOO_BIG = str(2**64)

BAD_CONFIG = [
    (["seed=" + SEED_TOO_BIG], ["seed", "2**63"]),
    (["seed=-1"], ["seed=-1"]),
    (["long.strategy=zigzag"], ["zigzag", "shift", "segments"]),
    (["device=tpu"], ["tpu", "cuda"]),
    (["dtype=int8"], ["int8", "bf16"]),
    (["output.preset=fastest"], ["fastest", "veryfast"]),
    (["output.crf=99"], ["output.crf=99", "51"]),
    (["sampling.motion_exp=-1"], ["sampling.motion_exp"]),
    (["output.fps=30"], ["output.fps", "25 fps"]),
    (["model.motion_exp=10"], ["sampling.motion_exp"]),
    (["sampling.stepz=3"], ["did you mean sampling.steps"]),
    (["promt=hello"], ["did you mean prompt"]),
    (["attention.kernel=flash"], ["flash-attn"]),
    (["sampling.cache=maybe"], ["maybe", "official", "adaptive", "off"]),
    (["sampling.cache_threshold=-1"], ["sampling.cache_threshold=-1", "≥ 0"]),
    (["sampling=fast", "sampling.cache_max_skip=0"], ["sampling.cache_max_skip=0", "≥ 1"]),
    (["sampling=quick"], ["quick", "fast", "official"]),
    (["model.adapter_after_double=[7]"], ["adapter_after_double", "[7]"]),
    (["audio.context_seconds=20"], ["audio.context_seconds"]),
    (["output_dir=somewhere"], ["output_dir", "batch"]),
    (["just-a-word"], ["just-a-word", "key=value"]),
]


@pytest.mark.parametrize("extra,expect", BAD_CONFIG, ids=[e[0][0][:24] for e in BAD_CONFIG])
def test_bad_config_values(capsys, tmp_path, tiny_weights, built, extra, expect):
    out = tmp_path / "o.mp4"
    _one_line(capsys, tiny_args(tiny_weights, out) + extra, expect, [out])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(capsys, tmp_path, tiny_weights, built):
    _one_line(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + ["device=cuda"], ["device=cuda"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_sage_kernel_without_cuda(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / "o.mp4"
    _one_line(
        capsys, tiny_args(tiny_weights, out) + ["attention.kernel=sage"], ["attention.kernel=sage", "CUDA"], [out]
    )


@pytest.mark.timeout(15)
@pytest.mark.parametrize("field", ["image", "audio"])
def test_fifo_input_is_refused_without_blocking(capsys, tmp_path, tiny_weights, built, field):
    fifo = tmp_path / f"pipe.{field}"
    os.mkfifo(fifo)
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith(f"{field}=")]
    _one_line(capsys, args + [f"{field}={fifo}"], [str(fifo), "FIFO"])


def test_device_file_as_audio(capsys, tmp_path, tiny_weights, built):
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("audio=")]
    _one_line(capsys, args + ["audio=/dev/zero"], ["/dev/zero", "device"])


def test_directory_as_image(capsys, tmp_path, tiny_weights, built):
    _one_line(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4") + [f"image={tmp_path}"], ["directory"])


def test_output_whose_temporaries_do_not_fit_the_name_limit(capsys, tmp_path, tiny_weights, built):
    out = tmp_path / ("n" * 220 + ".mp4")  # fits (224 bytes), its temporaries would not
    _one_line(capsys, tiny_args(tiny_weights, out), ["too long", "255"], [out])


@pytest.mark.parametrize("link", ["same", "hardlink", "symlink"])
def test_overwrite_never_replaces_an_input(capsys, tmp_path, tiny_weights, built, link):
    audio = tmp_path / "x.mp4"
    shutil.copy(EXAMPLES / "speech_5s.wav", audio)
    before = audio.read_bytes()
    out = {"same": audio, "hardlink": tmp_path / "h.mp4", "symlink": tmp_path / "s.mp4"}[link]
    if link == "hardlink":
        os.link(audio, out)
    elif link == "symlink":
        out.symlink_to(audio)
    args = tiny_args(tiny_weights, out, audio, "overwrite=true")
    _one_line(capsys, args, ["same file as audio", str(audio)])
    assert audio.read_bytes() == before


def test_audio_with_a_corrupt_middle(capsys, tmp_path, tiny_weights, built):
    from avatar.io.video import ffmpeg_exe

    mp3 = tmp_path / "speech.mp3"
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(EXAMPLES / "speech_5s.wav"), "-b:a", "64k", str(mp3)], check=True
    )
    data = bytearray(mp3.read_bytes())
    data[len(data) // 3 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 3)
    mp3.write_bytes(bytes(data))
    msg = _one_line(capsys, tiny_args(tiny_weights, tmp_path / "o.mp4", mp3), ["speech.mp3", "declares", "5.0"])
    assert "allow_damaged" in msg
    # with audio.allow_damaged=true the same input passes validation (with a warning)
    from avatar.compose import compose
    from avatar.validate import validate

    cfg = compose(tiny_args(tiny_weights, tmp_path / "o.mp4", mp3, "audio.allow_damaged=true"))
    assert len(validate(cfg).jobs) == 1


def test_prompt_file_problems(capsys, tmp_path, tiny_weights, built):
    args = tiny_args(tiny_weights, tmp_path / "o.mp4")
    _one_line(capsys, args + [f"prompt_file={tmp_path / 'none.txt'}"], ["prompt_file", "none.txt"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    _one_line(capsys, args + [f"prompt_file={empty}"], ["empty"])
    both = tmp_path / "p.txt"
    both.write_text("hi")
    _one_line(capsys, args + [f"prompt_file={both}", "prompt=hello"], ["not both"])


BAD_MANIFESTS = [
    (b'a,img.jpg,a.wav,"unterminated,25\nb,img.jpg,a.wav,fine,25\n', ["line 2", "unterminated quote"]),
    (b"a,img.jpg,a.wav,has\x00nul,25\n", ["line 2", "0x00"]),
    (b"a,img.jpg,a.wav,hello\n", ["line 2", "4 fields"]),
    (b'a,img.jpg,a.wav,"closed"then,25\n', ["line 2", "not valid CSV"]),
    (b"a,img.jpg,a.wav,\xff\xfe,25\n", ["line 2", "UTF-8"]),
    (b"a,img.jpg,a.wav,x,30\n", ["line 2", "30", "25 fps"]),
]


@pytest.mark.parametrize("body,expect", BAD_MANIFESTS, ids=["quote", "nul", "fields", "after-quote", "utf8", "fps"])
def test_bad_manifest_lines_are_named_and_nothing_is_created(capsys, tmp_path, tiny_weights, built, body, expect):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    out_dir = tmp_path / "out"
    _one_line(capsys, _batch_args(tiny_weights, _manifest(tmp_path, body), out_dir), expect, [out_dir])


def test_batch_config_problems(capsys, tmp_path, tiny_weights, built):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    manifest = _manifest(tmp_path, b"a,img.jpg,a.wav,hi,25\n")
    out_dir = tmp_path / "out"
    base = ["model=tiny", f"weights={tiny_weights}", f"batch={manifest}"]
    _one_line(capsys, base, ["output_dir"], [out_dir])
    _one_line(capsys, base + [f"output_dir={out_dir}", "batch.shard_index=1"], ["shard_count"], [out_dir])
    _one_line(
        capsys,
        base + [f"output_dir={out_dir}", "batch.shard_index=3", "batch.shard_count=2"],
        ["shard_index=3"],
        [out_dir],
    )
    _one_line(capsys, base + [f"output_dir={out_dir}", f"image={tmp_path / 'img.jpg'}"], ["image"], [out_dir])
    fifo = tmp_path / "rows_pipe.csv"
    os.mkfifo(fifo)
    _one_line(capsys, [*base[:2], f"batch={fifo}", f"output_dir={out_dir}"], ["FIFO"], [out_dir])
    # a row whose output is another row's input
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "b.mp4")
    out_dir2 = tmp_path / "o2"
    out_dir2.mkdir()
    os.link(tmp_path / "b.mp4", out_dir2 / "b.mp4")
    clash = _manifest(tmp_path, b"a,img.jpg,b.mp4,hi,25\nb,img.jpg,a.wav,hi,25\n", "clash.csv")
    _one_line(capsys, [*base[:2], f"batch={clash}", f"output_dir={out_dir2}", "overwrite=true"], ["same file"])


def test_truncated_weights_file(capsys, tmp_path, tiny_weights, built):
    from avatar.config import OFFICIAL_DIT_FILE

    copy = tmp_path / "w"
    shutil.copytree(tiny_weights, copy)
    dit = copy / OFFICIAL_DIT_FILE
    dit.write_bytes(dit.read_bytes()[:5000])
    args = [a for a in tiny_args(tiny_weights, tmp_path / "o.mp4") if not a.startswith("weights=")]
    _one_line(capsys, args + [f"weights={copy}"], [str(copy), "re-download"])


@pytest.mark.parametrize(
    "module", ["launch.generate", "launch.config", "launch.plan", "launch.batch", "launch.weights", "launch.serve"]
)
def test_help_of_every_entry_point(capsys, module):
    import importlib

    main = importlib.import_module(module).main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "python -m" in text
    if module in ("launch.generate", "launch.config", "launch.batch", "launch.serve"):
        assert "Config groups" in text and "model: hunyuan_avatar, tiny" in text and "prompt=TEXT" in text


@pytest.mark.timeout(60)
def test_help_of_submit():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.submit", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0 and "Examples" in proc.stdout, proc.stderr


def test_values_are_taken_literally(tmp_path):
    from avatar.compose import compose

    prompt = 'A woman, smiling, says: "it\'s ${HOME}" — 你好\nsecond line: ${oc.env:HOME}'
    image = str(tmp_path / "take:1, it's ${x}.jpg")
    cfg = compose(["model=tiny", f"prompt={prompt}", f"image={image}", "audio=file:x.wav", "output=a:b,c.mp4"])
    assert (cfg.prompt, cfg.image, cfg.audio.path, cfg.output.path) == (prompt, image, "file:x.wav", "a:b,c.mp4")
    from avatar.pipeline.job import config_dict

    assert config_dict(cfg)["prompt"] == prompt  # the report's config: never interpolated
    text = tmp_path / "prompt.txt"
    text.write_text(prompt + "\n", encoding="utf-8")
    assert compose(["model=tiny", f"prompt_file={text}"]).prompt == prompt


# --- issue 22: every field has a domain, checked before any model by every front end --------------------------------

#: (overrides, words of the one line): each of these was a traceback after the models had loaded, a refusal after
#: the models had loaded, or a refusal naming an internal variable instead of the key.
OUT_OF_DOMAIN = [
    (["model.window_frames=2"], ["model.window_frames=2", "4·k + 1"]),
    (["model.vae_tile_frames=0"], ["model.vae_tile_frames=0", "≥ 1"]),
    (["model.image_size=120", "model.bucket_multiple=8"], ["model.bucket_multiple=8", "multiple of 16"]),
    (["model.window_frames=0"], ["model.window_frames=0", "≥ 1"]),
    (["long.strategy=blend", "long.overlap_frames=33"], ["long.overlap_frames=33", "0..8"]),
    (["model.vae_tile_stride=160"], ["model.vae_tile_stride=160", "8 to 128"]),
    (["model.vae_tile_stride_frames=40"], ["model.vae_tile_stride_frames=40", "4 to 32"]),
    (["audio.sample_rate=8000"], ["audio.sample_rate=8000", "16000"]),
    (["sampling.joint_face_mask_scale=nan"], ["sampling.joint_face_mask_scale=nan", "≥ 0"]),
    (["model.clip_max_length=1000"], ["model.clip_max_length=1000", "1 to 77"]),
    (["model.text_hidden_layer=-100"], ["model.text_hidden_layer=-100", "-5 to 4"]),
    (["model.llava_image_size=1"], ["model.llava_image_size=1", "give 28"]),
]


@pytest.mark.parametrize("extra,expect", OUT_OF_DOMAIN, ids=[" ".join(e[0])[:40] for e in OUT_OF_DOMAIN])
def test_out_of_domain_values_before_any_model(capsys, tmp_path, tiny_weights, built, extra, expect):
    out = tmp_path / "o.mp4"
    _one_line(capsys, tiny_args(tiny_weights, out) + extra, expect, [out])


def test_out_of_domain_values_in_a_batch(capsys, tmp_path, tiny_weights, built):
    shutil.copy(EXAMPLES / "portrait.jpg", tmp_path / "img.jpg")
    shutil.copy(EXAMPLES / "speech_5s.wav", tmp_path / "a.wav")
    out_dir = tmp_path / "out"
    args = _batch_args(tiny_weights, _manifest(tmp_path, b"a,img.jpg,a.wav,hi,25\n"), out_dir, "model.window_frames=2")
    from launch import batch

    code = batch.main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "model.window_frames=2" in errors[0] and "Traceback" not in err, err
    assert not out_dir.exists()


def test_out_of_domain_values_in_the_python_api(tiny_weights, built):
    from avatar import AvatarPipeline

    with pytest.raises(InputError, match=r"^model.vae_tile_frames=0 is invalid"):
        AvatarPipeline.from_pretrained(tiny_weights, model="tiny", overrides=["model.vae_tile_frames=0"])
    with pytest.raises(InputError, match=r"^long.overlap_frames=33 with model.window_frames=33"):
        AvatarPipeline.from_pretrained(tiny_weights, model="tiny", long={"strategy": "blend", "overlap_frames": 33})


def test_out_of_domain_values_in_the_server(capsys, tmp_path, tiny_weights, built):
    """``launch.serve`` composes and checks its config before it binds or loads anything: a bad sampling value is
    refused at start-up, not in every job."""
    from launch.serve import main, prepare

    args = ["model=tiny", f"weights={tiny_weights}", f"serve.data_dir={tmp_path / 's'}"]
    with pytest.raises(InputError, match=r"^model.image_size=120 must be a positive multiple"):
        prepare([*args, "model.image_size=120"])
    assert main([*args, "sampling.shift=-1"]) == 2
    err = capsys.readouterr().err
    assert "sampling.shift=-1.0 is invalid; give a number > 0" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(150)
def test_out_of_domain_value_on_every_rank(tmp_path, tiny_weights):
    """Rank 1 of a 2-rank launch refuses it on its own, in validation: exit 2 at once, without reaching the process
    group (whose master, rank 0, does not exist here: joining it would wait), so no rank waits for another at a
    collective. Rank 0 alone writes the error line (the in-process tests above read it)."""
    from tests.e2e.conftest import env

    out = tmp_path / "o.mp4"
    ranks = dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.generate", *tiny_args(tiny_weights, out, None, "model.window_frames=2")],
        cwd=ROOT,
        env={**env(), **ranks, "MASTER_PORT": "9"},
        capture_output=True,
        text=True,
        timeout=140,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not out.exists()
