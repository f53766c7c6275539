"""The step caches measured in one run (docs/performance.md): the tiny model renders one clip with ``sampling=official``
(the official deep cache), ``sampling=fast`` (the adaptive step cache), ``sampling.cache=off`` and
``sampling.cache=adaptive`` (the official preset with the adaptive cache), with the models loaded once, and prints per
preset the steps, window calls, DiT forwards run / reused / last-block-only, the FLOPs of the run (our FLOP model,
``avatar.memory.flops``), the wall time and PSNR / SSIM against ``official``; then the forwards ratio and the FLOP
ratio of ``fast`` against ``official`` and of ``adaptive`` against ``off``.

    .venv/bin/python bench/cache_bench.py [--weights weights/tiny --model tiny --audio examples/speech_5s.wav
                                           --size 64 --json OUT.json] [extra overrides, e.g. sampling.cache_threshold=0.05]

On the real model use the GPU script (tests/gpu/quality.sh), which runs the same measurement at 512 px.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "official": ["sampling=official"],
    "fast": ["sampling=fast"],
    "off": ["sampling=official", "sampling.cache=off"],
    "adaptive": ["sampling=official", "sampling.cache=adaptive"],
}


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | cache | steps | window calls | forwards run | reused | last-block only | DiT FLOPs | total FLOPs "
        "| wall s | PSNR vs official | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cache = r["cache"] + (f" (threshold {r['threshold']:g})" if r["threshold"] is not None else "")
        lines.append(
            f"| {r['preset']} | {cache} | {r['steps']} | {r['window_calls']} | {r['forwards']} | {r['reused_forwards']} "
            f"| {r['cached_forwards']} | {r['dit_flops'] / 1e9:.2f} G | {r['total_flops'] / 1e9:.2f} G "
            f"| {r['seconds']:.1f} | {r['psnr']:.1f} dB | {r['ssim']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT / "weights" / "tiny"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--image", default=str(ROOT / "examples" / "portrait.jpg"))
    parser.add_argument("--audio", default=str(ROOT / "examples" / "speech_5s.wav"))
    parser.add_argument("--size", type=int, default=64, help="model.image_size (short side, px)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every preset")
    args = parser.parse_args()

    from avatar.perf import compare_presets, ratio

    overrides = [f"model.image_size={args.size}", f"device={args.device}", *args.overrides]
    presets = {name: [*extra, *args.overrides] for name, extra in PRESETS.items()}
    rows = compare_presets(
        args.weights, args.model, args.image, args.audio, presets, reference="official", overrides=overrides
    )
    print(table(rows))
    for name, against in (("fast", "official"), ("adaptive", "off")):
        print(
            f"{name} / {against}: forwards ratio {ratio(rows, name, against, 'forwards'):.3f}, "
            f"DiT FLOP ratio {ratio(rows, name, against, 'dit_flops'):.3f}, "
            f"total FLOP ratio {ratio(rows, name, against, 'total_flops'):.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
