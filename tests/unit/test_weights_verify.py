"""Weights folder checks (verify), the download selection and its refusal, and safe loading of bad files."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from avatar.compose import compose
from avatar.config import OFFICIAL_DIT_FILE, OFFICIAL_DIT_FP8_FILE, OFFICIAL_DIT_FP8_MAP_FILE
from avatar.io.errors import InputError
from avatar.weights.download import check_target, parse_components, select_files
from avatar.weights.files import BadCheckpoint, safe_torch_load, weights_fingerprint
from avatar.weights.verify import verify_weights
from launch.weights import main as weights_main

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: What the official repository holds (names as listed by the Hub), with the copies we must not download.
LISTING = [
    "README.md",
    "assets/demo.png",
    OFFICIAL_DIT_FILE,
    OFFICIAL_DIT_FP8_FILE,
    OFFICIAL_DIT_FP8_MAP_FILE,
    "ckpts/hunyuan-video-t2v-720p/vae/config.json",
    "ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt",
    "ckpts/llava_llama_image/config.json",
    "ckpts/llava_llama_image/model-00001-of-00002.safetensors",
    "ckpts/llava_llama_image/model-00002-of-00002.safetensors",
    "ckpts/llava_llama_image/model.safetensors.index.json",
    "ckpts/llava_llama_image/tokenizer.json",
    "ckpts/llava_llama_image/tokenizer_config.json",
    "ckpts/text_encoder_2/config.json",
    "ckpts/text_encoder_2/flax_model.msgpack",
    "ckpts/text_encoder_2/tf_model.h5",
    "ckpts/text_encoder_2/pytorch_model.bin",
    "ckpts/text_encoder_2/merges.txt",
    "ckpts/text_encoder_2/vocab.json",
    "ckpts/whisper-tiny/config.json",
    "ckpts/whisper-tiny/preprocessor_config.json",
    "ckpts/whisper-tiny/pytorch_model.bin",
    "ckpts/whisper-tiny/model.safetensors",
    "ckpts/det_align/detface.pt",
]


def test_select_files_takes_exactly_the_layout():
    files = select_files(LISTING, "bf16")
    assert OFFICIAL_DIT_FILE in files and OFFICIAL_DIT_FP8_FILE not in files
    assert not any(f.endswith((".msgpack", ".h5", ".png", "README.md")) for f in files)
    assert "ckpts/text_encoder_2/pytorch_model.bin" in files  # no safetensors there: the .bin
    assert "ckpts/whisper-tiny/pytorch_model.bin" not in files  # safetensors preferred
    assert "ckpts/llava_llama_image/model.safetensors.index.json" in files
    assert "ckpts/det_align/detface.pt" in files
    # snapshot_download filters the repository with these as allow_patterns: exactly these files come down
    from huggingface_hub.utils import filter_repo_objects

    assert sorted(filter_repo_objects(LISTING, allow_patterns=files)) == sorted(files)
    fp8 = select_files(LISTING, "fp8", parse_components("dit,vae"))
    assert fp8 == [
        OFFICIAL_DIT_FP8_FILE,
        OFFICIAL_DIT_FP8_MAP_FILE,
        "ckpts/hunyuan-video-t2v-720p/vae/config.json",
        "ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt",
    ]
    with pytest.raises(InputError, match="det_align/detface.pt"):
        select_files([f for f in LISTING if "det_align" not in f])
    with pytest.raises(InputError, match="valid are"):
        parse_components("dit,unet")
    with pytest.raises(InputError, match="--variant"):
        select_files(LISTING, "int8")


def test_download_refuses_the_tracked_weights_folder(tmp_path, capsys):
    assert weights_main(["download", str(ROOT / "weights")]) == 2
    err = capsys.readouterr().err
    assert "tracked weights/ folder" in err and err.count("\n") == 1
    assert check_target(tmp_path / "w") == tmp_path / "w"
    assert weights_main(["--help"]) == 0 and "avatar-weights download" in capsys.readouterr().out


def test_verify_tiny_weights(tiny_weights):
    tiny = compose(["model=tiny"])
    assert verify_weights(tiny_weights, tiny.model) == []
    assert verify_weights(tiny_weights, tiny.model, fp8=True) == []
    official = compose([])
    problems = verify_weights(tiny_weights, official.model)
    assert len(problems) == 1 and "this is model=tiny" in problems[0]


def _copy(tiny_weights: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(tiny_weights, dest)
    (dest / ".complete").unlink()
    return dest


def test_verify_names_every_junk_file(tiny_weights, tmp_path):
    root = _copy(tiny_weights, tmp_path / "w")
    official = compose([]).model
    # Without the marker, tiny weights checked as the official model still say what they are, per component.
    dims = verify_weights(root, official)
    assert any("DiT of hidden_size 64" in p for p in dims) and any("latent_channels 4" in p for p in dims)

    vae = root / "ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt"
    vae.write_bytes(b"<html>rate limited</html>")
    whisper = root / "ckpts/whisper-tiny/model.safetensors"
    whisper.write_bytes(whisper.read_bytes()[:-100])  # truncated download
    llava = root / "ckpts/llava_llama_image/model.safetensors"
    llava.write_bytes(b"\x00" * 64)
    clip = root / "ckpts/text_encoder_2/config.json"
    clip.write_text('{"hidden_size": 16,')
    dit = root / OFFICIAL_DIT_FILE
    dit.write_bytes(dit.read_bytes()[: dit.stat().st_size // 2])

    problems = verify_weights(root, compose(["model=tiny"]).model)
    for path in (vae, whisper, llava, clip, dit):
        [line] = [p for p in problems if str(path) in p]
        assert line.endswith("re-download it"), line
    assert any("truncated" in p for p in problems if str(whisper) in p)
    assert len(problems) == 5, problems


def test_verify_loads_the_official_face_detector(tiny_weights, tmp_path):
    from avatar.config import OFFICIAL_FACE_DETECTOR

    root = _copy(tiny_weights, tmp_path / "w")
    cfg = compose(["model=tiny", "model.face_detector=official"]).model
    assert verify_weights(root, cfg) == [f"face_detector: missing file {root / OFFICIAL_FACE_DETECTOR}"]
    detector = root / OFFICIAL_FACE_DETECTOR
    detector.parent.mkdir(parents=True)
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(str(detector))
    assert verify_weights(root, cfg) == []
    detector.write_bytes(detector.read_bytes()[:300])
    [line] = verify_weights(root, cfg)
    assert line.startswith(f"face_detector: {detector} is") and line.endswith("re-download it")


def test_unsafe_and_corrupt_files_are_refused_at_load(tiny_weights, tmp_path):
    from avatar.models.vae import load_vae
    from avatar.weights.load import load_dit

    root = _copy(tiny_weights, tmp_path / "w")
    vae = root / "ckpts/hunyuan-video-t2v-720p/vae/pytorch_model.pt"
    torch.save({"state_dict": {}, "where": pathlib.PurePosixPath("x")}, vae)  # a pickled non-tensor object
    [line] = verify_weights(root, compose(["model=tiny"]).model)
    assert line == f"vae: {vae} is not a safe checkpoint (it holds pickled objects other than tensors); re-download it"
    with pytest.raises(BadCheckpoint, match="not a safe checkpoint") as err:
        load_vae(vae.parent)
    assert "weights_only" not in str(err.value)
    dit = root / OFFICIAL_DIT_FILE
    dit.write_bytes(dit.read_bytes()[:1000])
    with pytest.raises(BadCheckpoint, match="truncated or corrupt.*re-download it"):
        load_dit(root, compose(["model=tiny"]).model, dtype=torch.float32, device="cpu")
    with pytest.raises(BadCheckpoint, match="truncated or corrupt"):
        safe_torch_load(dit)


def test_fingerprint_is_cheap_and_tracks_files(tiny_weights, tmp_path):
    first = weights_fingerprint(tiny_weights)
    assert first == weights_fingerprint(tiny_weights) and len(first) == 16
    root = _copy(tiny_weights, tmp_path / "w")
    assert weights_fingerprint(root) != first  # the marker is gone
    assert weights_fingerprint(tmp_path / "none") is None


def test_empty_weights_folder_stops_in_one_line(tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    out = tmp_path / "o.mp4"
    cmd = [sys.executable, "-m", "launch.generate", f"weights={empty}", f"output={out}"]
    cmd += [f"image={ROOT / 'examples/portrait.jpg'}", f"audio={ROOT / 'examples/speech_5s.wav'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "avatar-weights download" in lines[0] and "model=tiny" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()
