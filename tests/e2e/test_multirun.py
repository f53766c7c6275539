"""The README's sweep: ``launch.submit -m seed=1,2 'output.path=out_${seed}.mp4'`` writes one video per seed, and
each job's Hydra log keeps our log lines. The portrait has no face: the run still renders, warns once and the report
says ``face_found: false``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from tests.e2e.conftest import EXAMPLES, ROOT, env

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_two_seed_multirun_writes_one_file_per_seed(tiny_weights, tmp_path):
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"))
    audio = tmp_path / "short.wav"
    sf.write(str(audio), wav[: int(1.2 * rate)], rate)  # 30 frames: the point is the sweep, not the render
    image = tmp_path / "wall.png"
    ramp = np.linspace(60, 200, 160, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (160, 1))] * 3, axis=-1)).save(image)  # a plain gradient: no face
    cmd = [sys.executable, "-m", "launch.submit", "-m", "seed=1,2", f"output.path={tmp_path}/out_${{seed}}.mp4"]
    cmd += ["model=tiny", f"weights={tiny_weights}", f"image={image}", f"audio.path={audio}"]
    cmd += ["sampling.steps=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    for seed, job in ((1, 0), (2, 1)):
        out = tmp_path / f"out_{seed}.mp4"
        assert out.stat().st_size > 0
        report = json.loads((tmp_path / f"out_{seed}.mp4.json").read_text())
        assert report["seed"] == seed and report["face_found"] is False
        log = (tmp_path / "sweep" / str(job) / "submit.log").read_text()
        assert f"wrote {out}" in log and "decode: 30/30 frames" in log
        warnings = [line for line in log.splitlines() if "no face found" in line]
        assert len(warnings) == 1 and " W] " in warnings[0] and str(image) in warnings[0]
