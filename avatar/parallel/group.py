"""Process-group setup for in-process use: where this process sits (``DistEnv``), the device it computes on, the
backend, and the default group's creation and teardown. It reads no environment variable: the launcher
(``launch/dist.py``, the only reader of ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and ``SLURM_*``) passes the values in,
and a Python caller (``AvatarPipeline``) either joins the default group it created itself or runs as a world of one.

A world of one creates no process group at all; every parallel helper treats "no process group" as a world of one.
Otherwise the group uses NCCL for CUDA tensors (with gloo beside it for CPU tensors such as pickled objects) or gloo
alone on CPU.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("launch.dist")

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


def init_group(
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    device: str = "auto",
    init_method: str | None = None,
    timeout: timedelta | float | None = None,
) -> DistEnv:
    """Pick this rank's device and, for a world of more than one process, initialise the default process group
    (``init_method`` None: torch's ``env://`` rendezvous). ``timeout`` (a timedelta or seconds) bounds every
    collective."""
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
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            timeout=timeout or DEFAULT_TIMEOUT,
            rank=rank,
            world_size=world_size,
        )
        logger.info("process group: %s, world %d, device %s", backend, world_size, resolved)
    return env


def joined_env(device: str = "auto") -> DistEnv:
    """For a Python caller: the default process group it already created (its rank and world size; ranks on this
    node counted by host name), or a world of one when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return init_group(0, 1, 0, 1, device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    hosts: list = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    local_rank = hosts[:rank].count(hosts[rank])
    return init_group(rank, world_size, local_rank, hosts.count(hosts[rank]), device)


def destroy() -> None:
    """Tear the default process group down; a no-op when none exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
