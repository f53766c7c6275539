"""The run report (``<output>.json``): what was rendered, how, from what, and what it cost."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict

import torch

from avatar.config import FPS
from avatar.pipeline.job import Inputs, Job, config_dict, peak_host_memory_mb


def build_report(
    cfg, topo, job: Job, inputs: Inputs, strategy, stats, seams, timer, comm, seconds: float, face_found: bool, ranks
) -> dict:
    """``comm``: the ``CommStats`` counted over this render (this rank's collectives); ``ranks``: every rank's
    device and peak memory (``device_info``), in rank order."""
    import diffusers
    import transformers

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
        "denoise": asdict(stats),
        "communication": {name: {"calls": c, "bytes": b} for name, (c, b) in comm.snapshot().items()},
        "seams": seams,
        "timings_seconds": {k: round(v, 3) for k, v in timer.seconds.items()},
        "seconds_total": round(seconds, 3),
        "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "config": config_dict(cfg),
    }


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
