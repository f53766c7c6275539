"""A real local Slurm: first the harness itself (sbatch, arrays, srun), then the sbatch templates of launch/slurm/
running the real entry point on the tiny model (those need ``python -m launch.generate`` to work)."""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import ROOT

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
PYTHON = str(ROOT / ".venv" / "bin" / "python")


@pytest.mark.timeout(120)
def test_harness_runs_a_job_an_array_and_srun_tasks(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text(
        "#!/bin/bash\necho job=$SLURM_JOB_ID task=${SLURM_ARRAY_TASK_ID:-none}\nsrun -l bash -c 'echo rank=$SLURM_PROCID'\n"
    )
    job = slurm_cluster.sbatch("--ntasks-per-node=2", "-o", str(tmp_path / "hello-%j.out"), str(script))
    assert slurm_cluster.wait(job) == {job: "COMPLETED 0:0"}
    text = (tmp_path / f"hello-{job}.out").read_text()
    assert f"job={job} task=none" in text and "0: rank=0" in text and "1: rank=1" in text

    array = slurm_cluster.sbatch("--array=0-2", "-o", str(tmp_path / "arr-%A_%a.out"), str(script))
    states = slurm_cluster.wait(array)
    assert len(states) == 3 and set(states.values()) == {"COMPLETED 0:0"}
    for i in range(3):
        assert f"task={i}" in (tmp_path / f"arr-{array}_{i}.out").read_text()


PREEMPT_WORKER = """
import os, sys, time
import torch.distributed as dist
from avatar.pipeline.resume import Resume
from avatar.pipeline.topology import Topology
from launch.signals import EXIT_PREEMPTED, PreemptionHandler, record_preemption

state = sys.argv[1]
dist.init_process_group("gloo")
handler = PreemptionHandler().install()
resume = Resume(Topology(rank=dist.get_rank(), world=dist.get_world_size()), None, None, "shift", handler, frozenset(), 60, 0)
start = int(open(state).read()) if os.path.exists(state) else 0
if dist.get_rank() == 0:
    print(f"start step={start} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
for step in range(start, 60):
    time.sleep(0.1)
    if resume.stop_requested():
        if dist.get_rank() == 0:
            with open(state + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(state + ".tmp", state)
            print(f"preempted at step={step}", flush=True)
            record_preemption()
        dist.destroy_process_group()
        sys.exit(EXIT_PREEMPTED)
    if dist.get_rank() == 0 and step % 5 == 0:
        print(f"step={step}", flush=True)
rank = dist.get_rank()
dist.destroy_process_group()
if rank == 0:
    print("finished", flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "scancel_args", [["--batch", "--signal=USR1"], ["--signal=TERM"]], ids=["batch-usr1", "step-term"]
)
def test_generate_sbatch_forwards_preemption_and_requeues(slurm_cluster, tmp_path, scancel_args):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends) is forwarded to both torchrun workers; TERM to the
    step (what preemption with a grace time sends) reaches them directly. Either way they agree on a step, save and
    exit 75 (torchrun: 1, so rank 0 leaves the marker); the template requeues and the rerun resumes."""
    (tmp_path / "preempt_worker.py").write_text(PREEMPT_WORKER)
    env = (
        f"ALL,GPUS_PER_NODE=2,MODULE=preempt_worker,PYTHON={PYTHON},PYTHONPATH={tmp_path}:{ROOT},"
        f"AVATAR_PREEMPT_MARKER={tmp_path / 'preempted'}"
    )
    log = tmp_path / "pre.out"
    job = slurm_cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--export={env}",
        "-o",
        str(log),
        str(ROOT / "launch/slurm/generate.sbatch"),
        str(tmp_path / "step.txt"),
    )
    deadline = time.monotonic() + 90
    while "step=10" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no output"
        time.sleep(0.2)
    subprocess.run(["scancel", *scancel_args, job], env=slurm_cluster.env, check=True)
    states = slurm_cluster.wait(job, timeout=150)
    text = log.read_text()
    assert states == {job: "COMPLETED 0:0"}, text[-3000:]
    saved = int((tmp_path / "step.txt").read_text())
    assert f"preempted at step={saved}" in text and "requeueing job" in text
    assert f"start step={saved} restart=1" in text and text.rstrip().endswith("finished with exit 0")


@pytest.fixture(scope="module")
def tiny_weights_dir(tmp_path_factory) -> Path:
    from avatar.compose import compose
    from avatar.weights.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny-weights")
    make_tiny(folder, compose(["model=tiny"]).model, seed=0)
    return folder


def probe_frames(path: Path) -> int:
    from avatar.io.video import probe

    info = probe(str(path))
    assert info.audio_streams == 1, info
    return info.frames


@pytest.mark.timeout(300)
def test_generate_sbatch_two_workers_tiny(slurm_cluster, tiny_weights_dir, tmp_path):
    out = tmp_path / "out.mp4"
    job = slurm_cluster.sbatch(
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--export=ALL,GPUS_PER_NODE=2,PYTHON=" + PYTHON,
        "-o",
        str(tmp_path / "gen-%j.out"),
        str(ROOT / "launch/slurm/generate.sbatch"),
        "model=tiny",
        f"weights={tiny_weights_dir}",
        f"image={ROOT / 'examples/portrait.jpg'}",
        f"audio={ROOT / 'examples/speech_5s.wav'}",
        f"output={out}",
        "sampling.steps=2",
    )
    states = slurm_cluster.wait(job, timeout=280)
    log = (tmp_path / f"gen-{job}.out").read_text()
    assert states == {job: "COMPLETED 0:0"}, log[-3000:]
    assert "x 2 head localhost" in log
    assert probe_frames(out) == 125  # 5 s at 25 fps


@pytest.mark.timeout(300)
def test_array_sbatch_shards_a_two_row_manifest(slurm_cluster, tiny_weights_dir, tmp_path):
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "image", "audio", "prompt", "fps"])
        for videoid in ("first", "second"):
            writer.writerow(
                [videoid, ROOT / "examples/portrait.jpg", ROOT / "examples/speech_5s.wav", "A person talks.", 25]
            )
    out_dir = tmp_path / "videos"
    job = slurm_cluster.sbatch(
        "--array=0-1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--export=ALL,GPUS_PER_NODE=1,PYTHON=" + PYTHON,
        "-o",
        str(tmp_path / "arr-%A_%a.out"),
        str(ROOT / "launch/slurm/array.sbatch"),
        "model=tiny",
        f"weights={tiny_weights_dir}",
        f"batch={manifest}",
        f"output_dir={out_dir}",
        "sampling.steps=2",
    )
    states = slurm_cluster.wait(job, timeout=280)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("arr-*.out")))
    assert len(states) == 2 and set(states.values()) == {"COMPLETED 0:0"}, logs[-3000:]
    assert probe_frames(out_dir / "first.mp4") == 125 and probe_frames(out_dir / "second.mp4") == 125


@pytest.mark.timeout(300)
def test_submit_with_submitit_slurm_launcher(slurm_cluster, tiny_weights_dir, tmp_path):
    out = tmp_path / "sub.mp4"
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "launch.submit",
            "-m",
            "hydra/launcher=avatar_slurm",  # our preset on top of submitit_slurm
            "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=60",
            "hydra.launcher.gpus_per_node=null",  # the local test cluster has no GPUs
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "model=tiny",
            f"weights={tiny_weights_dir}",
            f"image={ROOT / 'examples/portrait.jpg'}",
            f"audio.path={ROOT / 'examples/speech_5s.wav'}",
            f"output.path={out}",
            "sampling.steps=2",
        ],
        cwd=ROOT,
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert probe_frames(out) == 125
