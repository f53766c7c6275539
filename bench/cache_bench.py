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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compare_presets(
    weights, model: str, image, audio, presets: dict[str, list[str]], *, reference: str, overrides=(), seed: int = 0
) -> list[dict]:
    """Render one clip under each preset (``name -> sampling overrides``, e.g. ``["sampling=fast"]``) with the models
    loaded once (``AvatarPipeline``), and measure each against ``reference``'s frames: wall seconds, window calls,
    DiT forwards run and reused, FLOPs of the run (``avatar.memory.flops``), PSNR and SSIM. Used by
    this bench and the GPU quality script (``tests/gpu/quality.sh``)."""
    from avatar.api import AvatarPipeline
    from avatar.compose import compose
    from avatar.perf import psnr, ssim

    pipe = AvatarPipeline.from_pretrained(weights, model=model, overrides=list(overrides))
    rows, frames = [], {}
    for name, extra in presets.items():
        # The same loaded models: only the sampling settings change between renders.
        pipe.cfg.sampling = compose([f"model={model}", f"weights={weights}", *overrides, *extra]).sampling
        start = time.perf_counter()
        result = pipe(image=image, audio=audio, seed=seed)
        seconds = time.perf_counter() - start
        denoise, flops = result.report["denoise"], result.report.get("flops", {})
        frames[name] = result.frames
        rows.append(
            {
                "preset": name,
                "cache": denoise["cache"],
                "threshold": denoise.get("cache_threshold"),
                "steps": result.report["steps"],
                "window_calls": denoise["window_calls"],
                "forwards": denoise["forwards"],
                "cached_forwards": denoise["cached_forwards"],
                "reused_forwards": denoise.get("reused_forwards", 0),
                "dit_flops": flops.get("stages", {}).get("dit", {}).get("flops"),
                "total_flops": flops.get("total"),
                "seconds": seconds,
                "denoise_seconds": result.report["timings_seconds"].get("denoise"),
                "schedule": [w.get("steps") for w in denoise.get("cache_windows", [])],
            }
        )
    for row in rows:
        row["psnr"] = psnr(frames[row["preset"]], frames[reference])
        row["ssim"] = ssim(frames[row["preset"]], frames[reference])
    pipe.close()
    return rows


def ratio(rows: list[dict], name: str, against: str, key: str) -> float:
    """``rows[name][key] / rows[against][key]``."""
    by = {row["preset"]: row for row in rows}
    return by[name][key] / by[against][key]


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
