"""Download exactly the files our layout needs from the official Hugging Face repository.

``select_files`` is the pure part: from the repository's file list, the files of the chosen variant (``bf16`` DiT, or
``fp8`` DiT + scale map) and components. The transformers folders keep their configs, tokenizers and one weight format
(safetensors when the folder has it, else ``pytorch_model*.bin``): the text_encoder_2 folder alone would otherwise
bring flax and TensorFlow copies. ``download`` hands that list to ``huggingface_hub.snapshot_download`` as
``allow_patterns`` (resumable: files already complete are skipped, partial ones continue).
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
)
from avatar.io.errors import InputError

REPO_ID = "tencent/HunyuanVideo-Avatar"
VARIANTS = ("bf16", "fp8")
COMPONENTS = ("dit", "vae", "llava", "clip", "whisper", "face_detector")

_HF_FOLDERS = {"llava": OFFICIAL_LLAVA_DIR, "clip": OFFICIAL_CLIP_DIR, "whisper": OFFICIAL_WHISPER_DIR}
#: Non-weight files of a transformers folder that loading reads (configs, tokenizers, processors).
_HF_SIDE_FILES = (".json", ".txt", ".model", ".tiktoken")


def check_target(folder: str | Path) -> Path:
    """Refuse the tracked ``weights/`` folder of a checkout (its README and manifest would be mixed with the
    download); any other folder is fine."""
    path = Path(folder)
    if (path / "manifest.yaml").is_file() and (path / "README.md").is_file():
        raise InputError(
            f"{path} is the repository's tracked weights/ folder (it holds manifest.yaml and README.md); download "
            f"into a folder of its own, e.g. `avatar-weights download {path / 'hunyuan_avatar'}`, and run with "
            f"weights={path / 'hunyuan_avatar'}"
        )
    return path


def parse_components(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return COMPONENTS
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise InputError(f"--components {','.join(unknown) or '(empty)'}: valid are {','.join(COMPONENTS)}")
    return tuple(dict.fromkeys(names))


def _hf_folder_files(listing: list[str], folder: str) -> list[str]:
    inside = [f for f in listing if f.startswith(folder + "/") and "/" not in f[len(folder) + 1 :]]
    side = [f for f in inside if f.endswith(_HF_SIDE_FILES)]
    safetensors = [f for f in inside if f.endswith(".safetensors")]
    weights = safetensors or [f for f in inside if Path(f).name.startswith("pytorch_model") and f.endswith(".bin")]
    if not safetensors:
        side = [f for f in side if not f.endswith("model.safetensors.index.json")]
    else:
        side = [f for f in side if not f.endswith("pytorch_model.bin.index.json")]
    return sorted(side + weights)


def select_files(listing: list[str], variant: str = "bf16", components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """The repository paths to download for ``variant`` and ``components`` (raises ``InputError`` when the
    repository lacks one of them)."""
    if variant not in VARIANTS:
        raise InputError(f"--variant {variant}: valid are {', '.join(VARIANTS)}")
    available = set(listing)
    wanted: list[str] = []
    for component in components:
        if component == "dit":
            files = [OFFICIAL_DIT_FILE] if variant == "bf16" else [OFFICIAL_DIT_FP8_FILE, OFFICIAL_DIT_FP8_MAP_FILE]
        elif component == "vae":
            files = [f"{OFFICIAL_VAE_DIR}/config.json", f"{OFFICIAL_VAE_DIR}/pytorch_model.pt"]
        elif component == "face_detector":
            files = [OFFICIAL_FACE_DETECTOR]
        else:
            files = _hf_folder_files(listing, _HF_FOLDERS[component])
            if not any(f.endswith("/config.json") for f in files):
                raise InputError(f"{REPO_ID} has no {_HF_FOLDERS[component]}/config.json ({component})")
        missing = [f for f in files if f not in available]
        if missing:
            raise InputError(f"{REPO_ID} has no {', '.join(missing)} ({component})")
        wanted += files
    return wanted


def download(
    folder: str | Path,
    variant: str = "bf16",
    components: tuple[str, ...] = COMPONENTS,
    *,
    repo_id: str = REPO_ID,
    revision: str | None = None,
) -> Path:
    """Download the selected files into ``folder`` (resumable); returns the folder."""
    from huggingface_hub import list_repo_files, snapshot_download

    target = check_target(folder)
    files = select_files(list_repo_files(repo_id, revision=revision), variant, components)
    target.mkdir(parents=True, exist_ok=True)
    snapshot_download(repo_id, revision=revision, local_dir=str(target), allow_patterns=files)
    return target
