"""How much memory a rank's device has free, asked before any weight is moved to it (the pre-flight).

In order: ``memory.gpu_memory_gb`` (plan for that much, whatever the device says); the provider set with
``set_provider`` (``launch/dist.py`` sets one from ``AVATAR_DEVICE_FREE_GB``, so tests and dry runs can make a CPU
process behave like a GPU with that much free memory); ``torch.cuda.mem_get_info()`` on a CUDA device; None on a
CPU (nothing to check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from avatar.config import MemoryConfig

_provider: Callable[[torch.device], int | None] | None = None


def set_provider(provider: Callable[[torch.device], int | None] | None) -> None:
    """``provider(device) -> free bytes`` (None: ask the device again)."""
    global _provider
    _provider = provider


def fixed_provider(free_gb: float) -> Callable[[torch.device], int]:
    """A provider reporting ``free_gb`` GB (10^9 bytes) free on every device."""
    free = int(free_gb * 10**9)
    return lambda device: free


def free_bytes(device: torch.device, memory: MemoryConfig) -> tuple[int | None, str]:
    """``(free bytes or None, where the number comes from)``."""
    if memory.gpu_memory_gb is not None:
        return int(memory.gpu_memory_gb * 10**9), "memory.gpu_memory_gb"
    if _provider is not None:
        return _provider(device), "the device-memory provider"
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"torch.cuda.mem_get_info({device})"
    return None, f"{device} (no GPU memory to check)"
