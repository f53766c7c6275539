"""The run report (``<output>.json``): what was rendered, how, from what, and what it cost."""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from avatar.config import FPS
from avatar.pipeline.job import Inputs, Job, config_dict, peak_host_memory_mb, resolve_dtype

log = logging.getLogger(__name__)


def build_report(
    cfg,
    topo,
    job: Job,
    inputs: Inputs,
    strategy,
    stats,
    seams,
    timer,
    comm,
    seconds: float,
    face_found: bool,
    ranks,
    decode: dict | None = None,
    flops: dict | None = None,
    memory: dict | None = None,
) -> dict:
    """``comm``: the ``CommStats`` counted over this render (this rank's collectives); ``ranks``: every rank's
    device and peak memory (``device_info``), in rank order; ``decode``: the decode's pieces per rank
    (``DecodeStats.as_dict``); ``flops``: the FLOP model (``run_flops``); ``memory``: the resolved memory plan (``MemoryPlan.as_dict()``: mode, why,
    placement, per-stage estimate in bytes, the GPU memory planned for)."""
    import diffusers
    import transformers

    from avatar.version import __version__

    return {
        "output": os.path.abspath(job.output),
        "videoid": job.videoid,
        "seed": job.seed,
        "steps": job.steps,
        "prompt": job.prompt,
        "strategy": strategy.name,
        "num_frames": inputs.num_frames,
        "fps": FPS,
        "duration_seconds": inputs.num_frames / FPS,
        "resolution": [inputs.width, inputs.height],
        "face_found": face_found,
        "audio_damaged": bool(inputs.audio_check.get("damaged", False)),
        "audio_seconds": {
            "decoded": inputs.audio_check.get("decoded_seconds"),
            "declared": inputs.audio_check.get("container_seconds"),
        },
        "inputs": {
            "image": os.path.abspath(job.image),
            "audio": os.path.abspath(job.audio),
            "sha256": inputs.hashes,
        },
        "plan": {
            "world": topo.world,
            "data": topo.data_size,
            "cfg": topo.cfg_size,
            "sequence": getattr(topo.seq, "world", 1),
        },
        "ranks": ranks,
        "memory": memory,
        "denoise": asdict(stats),
        "decode": decode,
        "flops": flops,
        "communication": {name: {"calls": c, "bytes": b} for name, (c, b) in comm.snapshot().items()},
        "seams": seams,
        "timings_seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds_total": round(seconds, 3),
        "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
        "launcher": {"version": __version__, "git_commit": git_commit()},
        "weights": {"path": os.path.abspath(cfg.weights), "fingerprint": weights_fingerprint(cfg.weights)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "config": config_dict(cfg),
    }


def run_flops(cfg, topo, strategy, stats, inputs: Inputs, timer, decode_stats, vae) -> dict:
    """The ``flops`` section (``avatar.memory.flops.flop_section``) of this render; on a failure of the model
    itself, ``{"error": ...}`` and a warning, never a failed render."""
    from avatar.memory.flops import flop_section

    device = topo.device
    ph, pw = cfg.model.patch_size[1:]
    h_lat, w_lat = inputs.height // cfg.model.vae_spatial_ratio, inputs.width // cfg.model.vae_spatial_ratio
    try:
        return flop_section(
            cfg,
            window_latents=len(strategy.windows(0)[0]),
            grid_tokens=(h_lat // ph, w_lat // pw),
            window_calls=stats.window_calls,
            cached_window_calls=stats.cached_window_calls,
            reused_window_calls=stats.reused_window_calls,
            encoder_flops=dict(timer.flops),
            decode_plans=decode_stats.plans,
            vae_config=dict(vae.config),
            vae_dtype=next(vae.parameters()).dtype,
            dit_dtype=resolve_dtype(cfg.dtype, device),
            seconds=timer.seconds,
            world=topo.world,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            on_gpu=device.type == "cuda",
            speakers=len(inputs.speaker_audio.tracks) if inputs.speaker_audio is not None else 1,
        )
    except Exception as error:  # noqa: BLE001 - the FLOP model must not fail a finished render
        log.warning("flops: the FLOP model failed (%s: %s); the report has no flops", type(error).__name__, error)
        return {"error": f"{type(error).__name__}: {error}"}


def device_info(device: torch.device) -> dict:
    """This rank's device name and peak memory (GPU: allocated by torch; CPU: host resident set)."""
    if device.type == "cuda":
        return {
            "device": str(device),
            "name": torch.cuda.get_device_name(device),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
        }
    return {
        "device": str(device),
        "name": platform.processor() or platform.machine(),
        "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
    }


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout the launcher runs from (``+dirty`` with local changes); ``None`` for an installed
    package or without git."""
    source = Path(__file__).resolve().parents[2]
    if not (source / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


@functools.cache
def weights_fingerprint(weights_dir: str) -> str | None:
    """Hash of the weights folder's file names, sizes and headers (``avatar.weights.files.weights_fingerprint``),
    once per process and folder."""
    from avatar.weights.files import weights_fingerprint as fingerprint

    return fingerprint(weights_dir)
