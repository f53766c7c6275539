"""Batches, resume and preemption with the real entry point on the tiny model.

- 5 manifest rows on 2 ranks with ``parallel.data=2``: each row rendered once, frames equal to one process.
- SIGKILL of one rank at a random denoising step, then the same command again: finished rows are not re-rendered,
  the row in progress continues from its checkpoint, and every mp4 equals the uninterrupted run frame for frame.
- SIGTERM: exit code 75 with a checkpoint and no output; the same command resumes from it to the same video.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, ROOT, env, generate

pytestmark = pytest.mark.slow
PROMPTS = ["A woman talks.", "A woman smiles and talks.", "A person speaks.", "Someone is talking.", "A calm speaker."]
STEPS = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Five rows of 2 s clips, official CSV with a BOM and paths relative to the manifest's folder."""
    folder = tmp_path_factory.mktemp("manifest")
    wav, rate = sf.read(str(EXAMPLES / "speech_5s.wav"), dtype="float32")
    (folder / "media").mkdir()
    (folder / "media" / "face.jpg").write_bytes((EXAMPLES / "portrait.jpg").read_bytes())
    path = folder / "rows.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "image", "audio", "prompt", "fps"])
        for i, prompt in enumerate(PROMPTS):
            clip = f"media/clip{i}.wav"
            start = int(i * 0.5 * rate)
            sf.write(str(folder / clip), wav[start : start + 2 * rate], rate)
            writer.writerow([f"row{i}", "media/face.jpg", clip, prompt, 25])
    return path


def batch_args(weights: Path, manifest: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny",
        f"weights={weights}",
        f"batch={manifest}",
        f"output_dir={out_dir}",
        f"sampling.steps={STEPS}",
        "model.image_size=64",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tiny_weights, manifest, tmp_path_factory) -> Path:
    """The uninterrupted single-process batch."""
    out_dir = tmp_path_factory.mktemp("reference")
    result = generate(*batch_args(tiny_weights, manifest, out_dir), timeout=580)
    assert result.returncode == 0, result.stderr[-4000:]
    return out_dir


def _frames(path: Path) -> np.ndarray:
    from tests.utils.video import read_frames

    return read_frames(str(path))


def _assert_same_videos(out_dir: Path, reference: Path) -> None:
    for i in range(len(PROMPTS)):
        np.testing.assert_array_equal(_frames(out_dir / f"row{i}.mp4"), _frames(reference / f"row{i}.mp4"), f"row{i}")


@pytest.mark.timeout(600)
def test_batch_summary_of_the_reference(reference):
    summary = json.loads((reference / "batch_summary.json").read_text())
    assert summary["num_done"] == 5 and summary["num_failed"] == 0
    assert sorted(d["videoid"] for d in summary["done"]) == [f"row{i}" for i in range(5)]
    # different prompts make different videos
    assert not np.array_equal(_frames(reference / "row0.mp4"), _frames(reference / "row1.mp4"))


@pytest.mark.timeout(600)
def test_rows_spread_over_two_data_groups_equal_one_process(tiny_weights, manifest, reference, tmp_path):
    result = generate(*batch_args(tiny_weights, manifest, tmp_path, "parallel.data=2"), nproc=2, timeout=580)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "batch_summary.json").read_text())
    done = [d["videoid"] for d in summary["done"]]
    assert sorted(done) == [f"row{i}" for i in range(5)] and len(done) == len(set(done))
    _assert_same_videos(tmp_path, reference)


def _torchrun(args: list[str], nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [*cmd, "-m", "launch.generate", *args],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _workers(parent: int) -> list[int]:
    """Worker pids: the children of torchrun that run launch.generate."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"launch.generate" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(900)
def test_sigkill_of_one_rank_then_rerun_loses_nothing(tiny_weights, manifest, reference, tmp_path):
    rng = random.Random(os.getpid())
    wait_done = rng.choice([1, 2])
    wait_checkpoints = rng.choice([1, 2, 3])
    args = batch_args(tiny_weights, manifest, tmp_path, "parallel.data=2", "checkpoint_every=1")
    proc = _torchrun(args, nproc=2)
    state = tmp_path / ".state" / "jobs"
    seen = set()
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, "the batch ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            done = list(state.glob("*/done.json")) if state.exists() else []
            for ckpt in state.glob("*/checkpoint.pt") if state.exists() else []:
                seen.add((ckpt.parent.name, ckpt.stat().st_mtime_ns))
            if len(done) >= wait_done and len(seen) >= wait_checkpoints and list(state.glob("*/checkpoint.pt")):
                break
            time.sleep(0.05)
        victim = rng.choice(_workers(proc.pid))
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    # the rows the kill left mid-denoise with a step checkpoint (a row seen with one may have finished meanwhile)
    survivors = [c for c in state.glob("*/checkpoint.pt") if not (c.parent / "done.json").exists()]
    finished = {p.stem: p.stat().st_mtime_ns for p in tmp_path.glob("row*.mp4")}
    assert finished, "no row had finished before the kill"

    result = generate(*args, nproc=2, timeout=580)
    assert result.returncode == 0, result.stderr[-4000:]
    for name, mtime in finished.items():
        assert (tmp_path / f"{name}.mp4").stat().st_mtime_ns == mtime, f"{name} was rendered again"
    summary = json.loads((tmp_path / "batch_summary.json").read_text())
    assert sorted(d["videoid"] for d in summary["skipped"]) == sorted(finished)
    assert summary["num_done"] == 5 - len(finished)
    resumed = [
        json.loads((tmp_path / f"{d['videoid']}.mp4.json").read_text())["denoise"]["resumed_from_step"]
        for d in summary["done"]
    ]
    # every checkpointed row resumes from its checkpoint, the others start afresh
    assert sum(step is not None and step >= 1 for step in resumed) == len(survivors), (resumed, survivors)
    _assert_same_videos(tmp_path, reference)


@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_exits_75_and_resumes(tiny_weights, tmp_path):
    from avatar.compose import compose
    from avatar.pipeline.resume import job_state
    from avatar.pipeline.run import Job, config_dict
    from avatar.pipeline.state import StateStore, single_state_dir

    out = tmp_path / "term.mp4"
    args = [
        "model=tiny",
        f"weights={tiny_weights}",
        f"image={EXAMPLES / 'portrait.jpg'}",
        f"audio={EXAMPLES / 'speech_5s.wav'}",
        f"output={out}",
        "sampling.steps=12",
        "checkpoint_every=0",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.generate", *args], cwd=ROOT, env=env(), stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stderr:
            if "denoising" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        code = proc.wait(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 75
    assert not out.exists()
    cfg = compose(args)
    job = Job(str(EXAMPLES / "portrait.jpg"), str(EXAMPLES / "speech_5s.wav"), cfg.prompt, str(out), 128, 12)
    key, _ = job_state(config_dict(cfg), job)
    step, tensors, meta = StateStore(single_state_dir(out)).load_checkpoint(key)
    assert 1 <= step < 12 and meta["strategy"] == "shift" and tensors["latents"].ndim == 5

    result = generate(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(out.with_name("term.mp4.json").read_text())["denoise"]["resumed_from_step"] == step
    assert not single_state_dir(out).exists()

    uninterrupted = tmp_path / "whole.mp4"
    whole = generate(*[a if not a.startswith("output=") else f"output={uninterrupted}" for a in args], timeout=300)
    assert whole.returncode == 0, whole.stderr[-4000:]
    np.testing.assert_array_equal(_frames(out), _frames(uninterrupted))
