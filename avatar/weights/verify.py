"""Check a weights folder against the expected layout before anything is built.

``verify_weights`` lists every problem: missing files of each component, and every missing, unexpected, mis-shaped or
wrongly typed DiT entry (read from the checkpoint's metadata without loading the tensors). An empty list means the
folder matches.
"""

from __future__ import annotations

from pathlib import Path

from avatar.config import (
    OFFICIAL_CLIP_DIR,
    OFFICIAL_DIT_FILE,
    OFFICIAL_DIT_FP8_FILE,
    OFFICIAL_DIT_FP8_MAP_FILE,
    OFFICIAL_FACE_DETECTOR,
    OFFICIAL_LLAVA_DIR,
    OFFICIAL_VAE_DIR,
    OFFICIAL_WHISPER_DIR,
    ModelConfig,
)


def required_files(cfg: ModelConfig, fp8: bool = False) -> dict[str, list[str]]:
    """Component -> files (relative to the weights folder) that must exist."""
    files = {
        "dit": [OFFICIAL_DIT_FP8_FILE, OFFICIAL_DIT_FP8_MAP_FILE] if fp8 else [OFFICIAL_DIT_FILE],
        "vae": [f"{OFFICIAL_VAE_DIR}/config.json", f"{OFFICIAL_VAE_DIR}/pytorch_model.pt"],
        "whisper": [f"{OFFICIAL_WHISPER_DIR}/config.json", f"{OFFICIAL_WHISPER_DIR}/preprocessor_config.json"],
        "llava": [f"{OFFICIAL_LLAVA_DIR}/config.json"],
        "clip": [f"{OFFICIAL_CLIP_DIR}/config.json"],
    }
    if cfg.face_detector == "official":
        files["face_detector"] = [OFFICIAL_FACE_DETECTOR]
    return files


def verify_weights(
    weights_dir: str | Path, cfg: ModelConfig, *, fp8: bool = False, load_key: str = "module"
) -> list[str]:
    """Every problem of the folder, one line each (empty: it matches ``cfg``)."""
    root = Path(weights_dir)
    if not root.is_dir():
        return [
            f"weights folder {root} does not exist (download: huggingface-cli download tencent/HunyuanVideo-Avatar --local-dir {root}; tiny model: python -m launch.weights make-tiny {root})"
        ]
    problems = []
    for component, files in required_files(cfg, fp8).items():
        for rel in files:
            if not (root / rel).is_file():
                problems.append(f"{component}: missing file {root / rel}")
    dit_file = root / (OFFICIAL_DIT_FP8_FILE if fp8 else OFFICIAL_DIT_FILE)
    if dit_file.is_file():
        from avatar.weights.load import verify_dit_checkpoint

        problems += [f"dit: {p}" for p in verify_dit_checkpoint(dit_file, cfg, fp8=fp8, load_key=load_key)]
    return problems
