"""What a weights folder holds: the files per component (official layout, ``avatar/config.py`` OFFICIAL_*) and the
exact DiT state dict (key -> shape, dtype) a ``ModelConfig`` expects."""

from __future__ import annotations

from pathlib import Path

import torch

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

#: Storage dtype of the fp8 checkpoint's quantised weights.
FP8_DTYPE = torch.float8_e4m3fn
#: Only nn.Linear layers under these prefixes are quantised (official ``fp8_optimization.py``).
FP8_BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")


def expected_files(cfg: ModelConfig, fp8: bool = False) -> dict[str, list[str]]:
    """Component -> files (relative to the weights folder) the official layout holds."""
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


def fp8_map_path(checkpoint: str | Path) -> Path:
    """The scale map beside an fp8 checkpoint (official: ``ckpt.replace('.pt', '_map.pt')``)."""
    path = Path(checkpoint)
    return path.with_name(path.stem + "_map.pt")


def is_fp8_weight(key: str, shape: tuple[int, ...]) -> bool:
    """Whether ``key`` is the weight of an nn.Linear the fp8 checkpoint stores in float8 (2-D, in a block)."""
    return key.startswith(FP8_BLOCK_PREFIXES) and key.endswith(".weight") and len(shape) == 2


def expected_state_dict(
    cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, fp8: bool = False
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of the DiT built in ``dtype`` (official fp32 modules stay fp32; with ``fp8`` the block
    Linear weights are float8). Built on the meta device: no memory."""
    from avatar.models.transformer import AvatarDiT

    with torch.device("meta"):
        model = AvatarDiT(cfg, dtype=dtype)
    expected = {}
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        expected[key] = (shape, FP8_DTYPE if fp8 and is_fp8_weight(key, shape) else tensor.dtype)
    return expected
