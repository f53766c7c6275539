"""The GPU quality check of the step caches (``tests/gpu/quality.sh``): the real model renders one 5 s clip at 512 px
with ``sampling=official`` and with ``sampling=fast`` (models loaded once) and prints, per preset, the wall time, the
DiT forwards run and reused, the FLOPs (``avatar.memory.flops``), and PSNR / SSIM of ``fast`` against ``official``,
so that ``sampling.cache_threshold`` is set from the real model. Extra arguments are config overrides for both
renders (e.g. ``sampling.cache_threshold=0.05``).

Skips (exit 0) without a CUDA GPU; without the official weights (``WEIGHTS``, default ``weights/hunyuan_avatar``) it
measures the tiny model (``weights/tiny``) on the GPU instead and says so. Results
also go to ``$OUT/quality.json`` and ``$OUT/quality.md`` when ``$OUT`` is set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SIZE = 512
AUDIO = ROOT / "examples" / "speech_5s.wav"
IMAGE = ROOT / "examples" / "portrait.jpg"
PRESETS = {"official": ["sampling=official"], "fast": ["sampling=fast"]}


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        print("gpu quality: skipped (no CUDA GPU visible to torch)")
        return 0
    weights, model = os.environ.get("WEIGHTS", str(ROOT / "weights" / "hunyuan_avatar")), "hunyuan_avatar"
    if not (Path(weights) / "ckpts" / "hunyuan-video-t2v-720p").is_dir():
        if not (ROOT / "weights" / "tiny" / "ckpts").is_dir():
            print(f"gpu quality: skipped (no weights at {weights}; set WEIGHTS=DIR)")
            return 0
        print(f"gpu quality: no official weights at {weights} (set WEIGHTS=DIR): the tiny model on the GPU instead")
        weights, model = str(ROOT / "weights" / "tiny"), "tiny"
    sys.path.insert(0, str(ROOT / "bench"))
    from cache_bench import compare_presets, ratio, table

    overrides = [f"model.image_size={SIZE}", "device=cuda", *argv]
    presets = {name: [*extra, *argv] for name, extra in PRESETS.items()}
    rows = compare_presets(weights, model, str(IMAGE), str(AUDIO), presets, reference="official", overrides=overrides)
    text = table(rows)
    fast = next(r for r in rows if r["preset"] == "fast")
    text += (
        f"\nfast / official: wall {ratio(rows, 'fast', 'official', 'seconds'):.3f}, "
        f"forwards {ratio(rows, 'fast', 'official', 'forwards'):.3f}, "
        f"DiT FLOPs {ratio(rows, 'fast', 'official', 'dit_flops'):.3f}; "
        f"PSNR {fast['psnr']:.2f} dB, SSIM {fast['ssim']:.4f} ({torch.cuda.get_device_name(0)})"
    )
    print(text)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "quality.json").write_text(json.dumps(rows, indent=2, default=str))
        (Path(out) / "quality.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
