"""Process-group setup: the only module that reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and friends.

A plain ``python -m launch.generate`` (no torchrun, ``WORLD_SIZE`` unset or 1) creates no process group at all;
every parallel helper treats "no process group" as a world of one. Under torchrun/srun the group uses NCCL for CUDA
tensors (with gloo beside it for CPU tensors such as pickled objects) or gloo alone on CPU.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Collective timeout when none is given: long, because rank 0 may preprocess (text/audio encoders) while the
#: others already wait in a broadcast.
DEFAULT_TIMEOUT = timedelta(minutes=30)
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on its node and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def peek_rank() -> int:
    """Global rank from the environment without touching any process group (0 for a plain process)."""
    return _env_int("RANK", 0)


def read_env() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from the launcher's environment (defaults: one
    process)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1 if world_size == 1 else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, world_size, local_rank, local_world_size


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto`` → ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {DEVICES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors plus gloo for CPU tensors on GPU hosts; gloo alone on CPU."""
    return "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", timeout: timedelta | float | None = None) -> DistEnv:
    """Read the launcher's environment and, for a world of more than one process, initialise the default process
    group. ``timeout`` (a timedelta or seconds) bounds every collective."""
    rank, world_size, local_rank, local_world_size = read_env()
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    env = DistEnv(rank, world_size, local_rank, resolved, local_world_size)
    if world_size == 1:
        return env
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    if not dist.is_initialized():
        backend = backend_for(resolved)
        dist.init_process_group(backend=backend, timeout=timeout or DEFAULT_TIMEOUT, rank=rank, world_size=world_size)
        logger.info("process group: %s, world %d, device %s", backend, world_size, resolved)
    return env


def destroy() -> None:
    """Tear the default process group down; a no-op when none exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
