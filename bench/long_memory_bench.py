"""Peak resident memory of the `segments` strategy against audio length (tiny model, CPU).

Renders 10 s, 40 s and 160 s of speech (the example clip repeated) in separate processes and prints each run's peak
resident memory relative to the 10 s run. The claim: memory does not grow with the audio length (160 s within 1.25×
of 10 s), because segments are denoised one round at a time and frames are streamed into ffmpeg.

    .venv/bin/python bench/long_memory_bench.py [--weights weights/tiny] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def make_audio(seconds: float, folder: Path) -> Path:
    speech, rate = sf.read(ROOT / "examples" / "speech_16s.wav", dtype="float32")
    reps = int(np.ceil(seconds * rate / len(speech)))
    audio = np.tile(speech, reps)[: int(seconds * rate)]
    path = folder / f"speech_{int(seconds)}s.wav"
    sf.write(path, audio, rate)
    return path


def render(weights: Path, audio: Path, output: Path, steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "launch.generate",
        "model=tiny",
        f"weights={weights}",
        f"image={ROOT / 'examples' / 'portrait.jpg'}",
        f"audio={audio}",
        f"output={output}",
        f"sampling.steps={steps}",
        "long.strategy=segments",
        "overwrite=true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    report = json.loads(Path(str(output) + ".json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT / "weights" / "tiny"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seconds", type=float, nargs="+", default=[10, 40, 160])
    args = parser.parse_args()
    weights = Path(args.weights)
    if not (weights / ".complete").exists():
        subprocess.run([sys.executable, "-m", "launch.weights", "make-tiny", str(weights)], cwd=ROOT, check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seconds in args.seconds:
            audio = make_audio(seconds, folder)
            report = render(weights, audio, folder / f"out_{int(seconds)}.mp4", args.steps)
            rows.append((seconds, report["peak_host_memory_mb"], report["num_frames"], report["wall_seconds"]))
    base = rows[0][1]
    print(f"{'audio s':>8} {'frames':>7} {'peak RSS MB':>12} {'vs first':>9} {'wall s':>7}")
    for seconds, peak, frames, wall in rows:
        print(f"{seconds:8.0f} {frames:7d} {peak:12.1f} {peak / base:8.2f}x {wall:7.1f}")
    worst = max(peak for _, peak, _, _ in rows) / base
    print(f"largest / first: {worst:.2f}x (claim: <= 1.25x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
