"""One owner per output folder (issue 22), with the real entry point on the tiny model.

Two batches started at once on one ``output_dir``: one renders, the other refuses in one line naming the holder's pid
and host (exit 3) and touches nothing (before, the loser's conflict path cleared the shared done marks and wrote
"0 done, 3 failed" over the winner's summary, and a rerun then stopped at "r0.mp4 already exists"); a rerun skips
every finished row. With ``batch.wait_for_lock=true`` the second waits for the first and then skips what it
finished. A kill between a video's publish and its report: the rerun writes the report instead of refusing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, ROOT, env, generate

ROWS = 3


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lock-manifest")
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    lines = ["videoid,image,audio,prompt,fps"]
    for i in range(ROWS):
        sf.write(str(folder / f"clip{i}.wav"), wav[i * rate // 2 : i * rate // 2 + rate], rate)
        lines.append(f"r{i},{EXAMPLES / 'portrait.jpg'},clip{i}.wav,A person talks {i}.,25")
    path = folder / "rows.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(weights, manifest, out_dir, *extra) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"batch={manifest}",
        f"output_dir={out_dir}",
        "sampling.steps=2",
        "model.image_size=64",
        "device=cpu",
        *extra,
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(
        [sys.executable, "-m", "launch.generate", *args], cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT
    )


def _two_at_once(tmp_path, args_a, args_b):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(args_a, logs[0]), _start(args_b, logs[1])]
    try:
        codes = [p.wait(timeout=500) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, codes, [log.read_text() for log in logs]


def _summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "batch_summary.json").read_text())


@pytest.mark.timeout(900)
def test_second_batch_on_one_output_dir_refuses_and_the_rerun_skips_every_row(tiny_weights, manifest, tmp_path):
    out_dir = tmp_path / "out"
    args = _args(tiny_weights, manifest, out_dir)
    procs, codes, logs = _two_at_once(tmp_path, args, args)
    assert sorted(codes) == [0, 3], logs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    errors = [line for line in logs[loser].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in logs[loser], logs[loser]
    assert f"output_dir={out_dir} is in use by another run" in errors[0]
    assert f"pid {procs[winner].pid} on host {socket.gethostname()}" in errors[0]
    assert "Traceback" not in logs[winner]
    summary = _summary(out_dir)  # the winner's, never overwritten by the loser
    assert summary["num_done"] == ROWS and summary["num_failed"] == 0
    finished = {p.name: p.stat().st_mtime_ns for p in out_dir.glob("r*.mp4")}
    assert len(finished) == ROWS and not list(out_dir.glob("*conflict*"))

    # what a kill during a checkpoint write leaves; the next owner of the folder removes it
    job = next((out_dir / ".state" / "jobs").iterdir())
    leftover = job / ".checkpoint.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")

    rerun = generate(*args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already exists" not in rerun.stderr and "Traceback" not in rerun.stderr
    assert not leftover.exists() and f"removed {leftover}" in rerun.stderr
    summary = _summary(out_dir)
    assert summary["num_done"] == 0 and summary["num_skipped"] == ROWS
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.glob("r*.mp4")} == finished


@pytest.mark.timeout(900)
def test_wait_for_lock_waits_then_skips_what_the_holder_finished(tiny_weights, manifest, tmp_path):
    out_dir = tmp_path / "out"
    args = _args(tiny_weights, manifest, out_dir, "batch.wait_for_lock=true")
    _, codes, logs = _two_at_once(tmp_path, args, args)
    assert codes == [0, 0], logs
    assert not any("Traceback" in log for log in logs)
    waited = [i for i, log in enumerate(logs) if "waiting for it to end" in log]
    assert len(waited) == 1, logs
    assert f"batch: {ROWS} done, 0 skipped, 0 failed" in logs[1 - waited[0]]
    assert f"batch: 0 done, {ROWS} skipped, 0 failed" in logs[waited[0]]
    assert len(list(out_dir.glob("r*.mp4"))) == ROWS and not list(out_dir.glob("*conflict*"))


@pytest.mark.timeout(600)
def test_missing_report_of_a_finished_video_is_written_by_the_rerun(tiny_weights, tmp_path, one_second_clip):
    """A kill after the mp4's publish and before its report: the rerun writes the report from the done mark (it
    used to refuse with "already exists")."""
    out = tmp_path / "v.mp4"
    args = [
        "model=tiny",
        f"weights={tiny_weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={one_second_clip}",
        f"output={out}",
        "sampling.steps=2",
        "model.image_size=64",
        "device=cpu",
    ]
    first = generate(*args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "v.mp4.json").read_text())
    # the state a kill at that moment leaves: the done mark (with the report) and the video, no report file
    from avatar.compose import compose
    from avatar.pipeline.job import config_dict
    from avatar.pipeline.resume import job_state
    from avatar.pipeline.state import StateStore, single_state_dir
    from avatar.validate import single_job

    cfg = compose(args)
    key, _ = job_state(config_dict(cfg), single_job(cfg))
    StateStore(single_state_dir(out)).mark_done(key, {"output": str(out), "report": report})
    (tmp_path / "v.mp4.json").unlink()
    mtime = out.stat().st_mtime_ns

    rerun = generate(*args, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "its report was missing" in rerun.stderr and "Traceback" not in rerun.stderr
    assert json.loads((tmp_path / "v.mp4.json").read_text()) == report
    assert out.stat().st_mtime_ns == mtime and not single_state_dir(out).exists()
