"""Check a weights folder against the expected layout before anything is built.

``verify_weights`` lists every problem: missing files of each component, and every missing, unexpected, mis-shaped or
wrongly typed DiT entry (read from the checkpoint's metadata without loading the tensors). An empty list means the
folder matches.
"""

from __future__ import annotations

from pathlib import Path

from avatar.config import OFFICIAL_DIT_FILE, OFFICIAL_DIT_FP8_FILE, ModelConfig
from avatar.weights.layout import expected_files


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
    for component, files in expected_files(cfg, fp8).items():
        for rel in files:
            if not (root / rel).is_file():
                problems.append(f"{component}: missing file {root / rel}")
    dit_file = root / (OFFICIAL_DIT_FP8_FILE if fp8 else OFFICIAL_DIT_FILE)
    if dit_file.is_file():
        from avatar.weights.load import verify_dit_checkpoint

        problems += [f"dit: {p}" for p in verify_dit_checkpoint(dit_file, cfg, fp8=fp8, load_key=load_key)]
    return problems
