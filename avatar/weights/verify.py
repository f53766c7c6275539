"""Check a weights folder the way loading will, before anything is built.

``verify_weights`` lists every problem, one line each (empty: the folder matches). Each component is checked with
the code its loader uses, on headers and metadata only (milliseconds, also for 26 GB files):

- DiT: every key, shape and dtype (from the ``.pt`` opened memory-mapped, or the safetensors headers);
- VAE: ``config.json`` parsed and mapped to the diffusers class, the model built on the meta device from it and every
  checkpoint tensor compared with it;
- Whisper, LLaVA, CLIP: ``config.json`` and the widths the DiT consumes, the shard index and every shard it names,
  each shard's header (or tensors-only ``.bin``), and tensor shapes against the model built from the config on meta;
- face detector: loaded (TorchScript);
- every file: truncated / corrupt / unsafe (pickled objects other than tensors) → "FILE ...; re-download it".

A missing or empty folder is one line with the download command and ``model=tiny``; tiny weights checked as another
model are one line saying "this is model=tiny".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from avatar.config import (
    OFFICIAL_CLIP_DIR,
    OFFICIAL_DIT_FILE,
    OFFICIAL_DIT_FP8_FILE,
    OFFICIAL_FACE_DETECTOR,
    OFFICIAL_LLAVA_DIR,
    OFFICIAL_VAE_DIR,
    OFFICIAL_WHISPER_DIR,
    ModelConfig,
)
from avatar.weights.files import BadCheckpoint, read_json, safe_torch_load, safetensors_header
from avatar.weights.layout import expected_files
from avatar.weights.tiny import MARKER

#: Written by ``make_tiny`` beside the tiny weights.
TINY_MARKER = MARKER


def download_hint(root: str | Path) -> str:
    """How to get weights into ``root`` (and the tiny alternative)."""
    return (
        f"download them with `avatar-weights download {root}` (or `hf download tencent/HunyuanVideo-Avatar "
        f"--local-dir {root}`), or try the built-in tiny model: `avatar-weights make-tiny weights/tiny` then "
        "model=tiny weights=weights/tiny"
    )


def verify_weights(
    weights_dir: str | Path, cfg: ModelConfig, *, fp8: bool = False, load_key: str = "module"
) -> list[str]:
    """Every problem of the folder, one line each (empty: it matches ``cfg``)."""
    root = Path(weights_dir)
    if not root.is_dir():
        return [f"weights={root} does not exist: {download_hint(root)}"]
    if not (root / "ckpts").is_dir():
        return [f"weights={root} holds no checkpoint (no ckpts/ folder): {download_hint(root)}"]
    made_for = _tiny_marker_model(root)
    if made_for is not None and made_for != cfg.name:
        return [
            f"weights={root} holds the model={made_for} weights written by make-tiny, not model={cfg.name}: this is "
            f"model={made_for}; add model={made_for} to the command"
        ]
    problems = []
    for component, files in expected_files(cfg, fp8).items():
        for rel in files:
            if not (root / rel).is_file():
                problems.append(f"{component}: missing file {root / rel}")
    checks = [
        ("dit", lambda: _check_dit(root, cfg, fp8, load_key)),
        ("vae", lambda: _check_vae(root / OFFICIAL_VAE_DIR, cfg)),
        ("whisper", lambda: _check_hf(root / OFFICIAL_WHISPER_DIR, "whisper", cfg)),
        ("llava", lambda: _check_hf(root / OFFICIAL_LLAVA_DIR, "llava", cfg)),
        ("clip", lambda: _check_hf(root / OFFICIAL_CLIP_DIR, "clip", cfg)),
    ]
    if cfg.face_detector == "official":
        checks.append(("face_detector", lambda: _check_detector(root / OFFICIAL_FACE_DETECTOR)))
    for component, check in checks:
        try:
            problems += [f"{component}: {line}" for line in check()]
        except BadCheckpoint as err:
            problems.append(f"{component}: {err}")
    return problems


def _tiny_marker_model(root: Path) -> str | None:
    marker = root / TINY_MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text()).get("model"))
    except (ValueError, AttributeError):
        return None


# --- DiT ----------------------------------------------------------------------------------------------------------


def _dit_dims(found: dict) -> tuple[int, int, int] | None:
    """(hidden_size, double blocks, single blocks) of a DiT state dict's metadata."""
    if "img_in.proj.weight" not in found:
        return None

    def depth(prefix: str) -> int:
        indices = [int(m.group(1)) for key in found if (m := re.match(rf"{prefix}\.(\d+)\.", key))]
        return max(indices) + 1 if indices else 0

    return found["img_in.proj.weight"][0][0], depth("double_blocks"), depth("single_blocks")


def _check_dit(root: Path, cfg: ModelConfig, fp8: bool, load_key: str) -> list[str]:
    from avatar.weights.load import dit_checkpoint_files, read_metadata, verify_dit_checkpoint

    if not (root / (OFFICIAL_DIT_FP8_FILE if fp8 else OFFICIAL_DIT_FILE)).is_file():
        return []  # reported as a missing file
    problems = verify_dit_checkpoint(root, cfg, fp8=fp8, load_key=load_key)
    if len(problems) <= 1:
        return problems
    files = dit_checkpoint_files(root, fp8)
    dims = _dit_dims(read_metadata(files, load_key))
    want = (cfg.hidden_size, cfg.depth_double, cfg.depth_single)
    if dims is not None and dims != want:
        return [
            f"{files[0]} is a DiT of hidden_size {dims[0]} with {dims[1]} double / {dims[2]} single blocks, "
            f"model={cfg.name} has {want[0]} with {want[1]} / {want[2]} ({len(problems)} mismatched entries): "
            "wrong model= for these weights, or a wrong file; re-download it"
        ]
    return problems


# --- VAE ----------------------------------------------------------------------------------------------------------


def _check_vae(vae_dir: Path, cfg: ModelConfig) -> list[str]:
    from avatar.models.vae import OFFICIAL_VAE_FILE, _diffusers_config

    config_path, weights_path = vae_dir / "config.json", vae_dir / OFFICIAL_VAE_FILE
    if not config_path.is_file() or not weights_path.is_file():
        return []  # reported as missing files
    raw = read_json(config_path)
    latent = raw.get("latent_channels")
    if latent != cfg.latent_channels:
        return [f"{config_path}: latent_channels {latent}, model={cfg.name} needs {cfg.latent_channels}"]
    from diffusers import AutoencoderKLHunyuanVideo

    try:
        with torch.device("meta"):
            model = AutoencoderKLHunyuanVideo(**_diffusers_config(raw))
    except (TypeError, ValueError, KeyError) as err:
        raise BadCheckpoint(f"{config_path} is not a usable VAE config ({err}); re-download it") from None
    checkpoint = safe_torch_load(weights_path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadCheckpoint(f"{weights_path} holds no VAE state dict; re-download it")
    found = {k.removeprefix("vae."): tuple(v.shape) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return _compare_shapes(weights_path, expected, found, strict=True)


def _compare_shapes(
    path: Path, expected: dict[str, tuple], found: dict[str, tuple], strict: bool, limit: int = 5
) -> list[str]:
    problems = []
    for key, shape in expected.items():
        if key in found and tuple(found[key]) != tuple(shape):
            problems.append(f"{path}: {key} has shape {tuple(found[key])}, the config gives {tuple(shape)}")
    if strict:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing:
            problems.append(f"{path}: {len(missing)} missing tensors (e.g. {', '.join(missing[:3])}); re-download it")
        if unexpected:
            problems.append(f"{path}: {len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if len(problems) > limit:
        problems = problems[:limit] + [f"{path}: … {len(problems) - limit} more shape problems"]
    return problems


# --- Whisper / LLaVA / CLIP (transformers folders) ----------------------------------------------------------------


def _hf_width_problems(kind: str, raw: dict, cfg: ModelConfig) -> list[str]:
    if kind == "whisper":
        got = raw.get("d_model")
        if got != cfg.audio_channels:
            return [f"d_model {got}, model={cfg.name} needs audio_channels {cfg.audio_channels}"]
        if raw.get("encoder_layers", 0) + 1 < cfg.audio_layers:
            return [f"encoder_layers {raw.get('encoder_layers')}, model={cfg.name} stacks {cfg.audio_layers} states"]
    elif kind == "llava":
        text = raw.get("text_config") or {}
        got = text.get("hidden_size")
        if raw.get("vision_config") is None:
            return [f"model_type {raw.get('model_type')!r} has no vision tower; expected a LLaVA config"]
        if got != cfg.text_states_dim:
            return [f"text hidden_size {got}, model={cfg.name} needs text_states_dim {cfg.text_states_dim}"]
    elif kind == "clip":
        got = raw.get("hidden_size", (raw.get("text_config") or {}).get("hidden_size"))
        if got != cfg.text_states_dim_2:
            return [f"hidden_size {got}, model={cfg.name} needs text_states_dim_2 {cfg.text_states_dim_2}"]
    return []


def _hf_weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The weight files transformers will read (index → shards, else single file), and problems of the index."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path = folder / index_name
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise BadCheckpoint(f"{index_path} has no weight_map; re-download it")
            shards = sorted(set(weight_map.values()))
            missing = [name for name in shards if not (folder / name).is_file()]
            if missing:
                return [], [f"missing shard {folder / name} (named by {index_path.name})" for name in missing]
            return [folder / name for name in shards], []
        if (folder / single).is_file():
            return [folder / single], []
    return [], [f"{folder} has no model weights (model.safetensors, its index, or pytorch_model.bin)"]


def _read_shapes(path: Path) -> dict[str, tuple]:
    if path.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in safetensors_header(path).items()}
    state = safe_torch_load(path)
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path} holds no state dict; re-download it")
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _meta_model_shapes(kind: str, folder: Path) -> dict[str, tuple]:
    from transformers import AutoConfig, CLIPTextModel, LlavaForConditionalGeneration, WhisperModel

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = {"whisper": WhisperModel, "llava": LlavaForConditionalGeneration, "clip": CLIPTextModel}[kind]
    if kind == "clip" and hasattr(config, "text_config"):
        config = config.text_config
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _match_by_suffix(expected: dict[str, tuple], found: dict[str, tuple]) -> dict[str, tuple]:
    """Checkpoint names -> model names where they differ only by a prefix (``model.``, ``language_model.``, ...),
    matched through the longest dotted suffix that names exactly one model tensor; ambiguous names are left out."""
    owners: dict[str, set[str]] = {}
    for key in expected:
        parts = key.split(".")
        for i in range(len(parts)):
            owners.setdefault(".".join(parts[i:]), set()).add(key)
    mapped = {}
    for key, shape in found.items():
        if key in expected:
            mapped[key] = shape
            continue
        parts = key.split(".")
        for i in range(1, len(parts) - 1):
            candidates = owners.get(".".join(parts[i:]))
            if candidates is None:
                continue
            if len(candidates) == 1:
                mapped[next(iter(candidates))] = shape
            break
    return mapped


def _check_hf(folder: Path, kind: str, cfg: ModelConfig) -> list[str]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return []  # reported as a missing file
    raw = read_json(config_path)
    widths = [f"{config_path}: {line}" for line in _hf_width_problems(kind, raw, cfg)]
    if widths:
        return widths
    if kind == "whisper" and (folder / "preprocessor_config.json").is_file():
        read_json(folder / "preprocessor_config.json")
    files, problems = _hf_weight_files(folder)
    found: dict[str, tuple] = {}
    for path in files:
        try:
            found.update(_read_shapes(path))
        except BadCheckpoint as err:
            problems.append(str(err))
    if problems or not files:
        return problems
    try:
        expected = _meta_model_shapes(kind, folder)
    except (ValueError, TypeError, KeyError, OSError) as err:
        return [f"{config_path} cannot build the model ({type(err).__name__}: {err}); re-download it"]
    return _compare_shapes(files[0] if len(files) == 1 else folder, expected, _match_by_suffix(expected, found), False)


# --- face detector ------------------------------------------------------------------------------------------------


def _check_detector(path: Path) -> list[str]:
    if not path.is_file():
        return []  # reported as a missing file
    from avatar.models.face import load_detector

    load_detector(path)
    return []
