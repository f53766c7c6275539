"""Ctrl-C (issue 22) with the real entry point on the tiny model: SIGINT at a random denoising step finishes the
step, saves a checkpoint and exits 130 with one line saying how to continue; the same command resumes to frames
identical to an uninterrupted run; no traceback in either log. A second Ctrl-C stops at once, still without a
traceback, and the next run cleans what it left and renders the same video."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS, ROOT, env, generate


def _args(weights, audio, out) -> list[str]:
    """The ``cli_reference`` job (conftest), to another output."""
    return [
        *FRONTEND_SETTINGS,
        f"weights={weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={audio}",
        f"output={out}",
        f"seed={REFERENCE_SEED}",
        f"sampling.steps={REFERENCE_STEPS}",
        "checkpoint_every=0",
    ]


def _frames(path) -> np.ndarray:
    from tests.utils.video import read_frames

    return read_frames(str(path))


def _interrupt(args, *whens) -> tuple[int, str]:
    """Start the render, send SIGINT once ``whens[0](line)`` matches a log line, again once ``whens[1]`` matches a
    later one, and so on; return the exit code and the whole log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.generate", *args],
        cwd=ROOT,
        env=env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines, pending = [], list(whens)
    try:
        for line in proc.stderr:
            lines.append(line)
            if pending and pending[0](line):
                proc.send_signal(signal.SIGINT)
                pending.pop(0)
                if not pending:
                    break
        lines.append(proc.stderr.read())
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, "".join(lines)


def _at_step(target: int):
    def when(line: str) -> bool:
        m = re.search(rf"denoise: (\d+)/{REFERENCE_STEPS} ", line)
        return m is not None and target <= int(m.group(1)) < REFERENCE_STEPS - 1

    return when


@pytest.mark.timeout(900)
def test_ctrl_c_at_a_step_checkpoints_and_the_rerun_gives_the_same_frames(
    tiny_weights, one_second_clip, cli_reference, tmp_path
):
    from avatar.pipeline.state import single_state_dir

    out = tmp_path / "ctrl_c.mp4"
    args = _args(tiny_weights, one_second_clip, out)
    target = random.Random().randint(1, REFERENCE_STEPS // 2)
    code, log = _interrupt(args, _at_step(target))
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    said = [line for line in log.splitlines() if line.startswith("interrupted after step")]
    assert len(said) == 1 and "run the same command to continue" in said[0], log[-3000:]
    step = int(said[0].split()[3].rstrip(":"))
    assert target < step < REFERENCE_STEPS
    assert not out.exists() and list(single_state_dir(out).glob("jobs/*/checkpoint.pt"))

    rerun = generate(*args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    assert json.loads((tmp_path / "ctrl_c.mp4.json").read_text())["denoise"]["resumed_from_step"] == step
    np.testing.assert_array_equal(_frames(out), _frames(cli_reference))
    assert not single_state_dir(out).exists()


@pytest.mark.timeout(900)
def test_second_ctrl_c_stops_at_once_and_the_next_run_cleans_up(
    tiny_weights, one_second_clip, cli_reference, tmp_path
):
    out = tmp_path / "twice.mp4"
    args = _args(tiny_weights, one_second_clip, out)
    started = time.monotonic()
    # the second press right after the handler's announcement of the first: mid-step, long before its checkpoint
    code, log = _interrupt(args, lambda line: "denoising" in line, lambda line: "Ctrl-C: finishing" in line)
    assert code == 130, log[-3000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "interrupted again: stopped at once" in log and "interrupted after step" not in log
    assert time.monotonic() - started < 200 and not out.exists()

    rerun = generate(*args, timeout=300)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    np.testing.assert_array_equal(_frames(out), _frames(cli_reference))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice.mp4", "twice.mp4.json"]
