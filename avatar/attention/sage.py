"""Optional 8-bit SageAttention (``attention.kernel=sage``, ``pip install avatar-launcher[sage]``): the mask-free
attention calls of the facade go to ``sageattention.sageattn`` (INT8 Q·Kᵀ, FP16 P·V, Triton kernels; CUDA only).

Only what the kernel supports goes to it: no mask, fp16/bf16, head dim 64 or 128. Anything else (a key mask, fp32,
another head dim) and every call that needs its log-sum-exp (the Ring blocks, ``avatar/attention/lse.py``) stays
on SDPA. ``check_kernel`` refuses the setting in one line before any model is built where it cannot run: no CUDA
device, or the package missing. Off by default; ``tests/gpu/check.sh`` measures its error against SDPA and its
speed-up.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from avatar.io.errors import InputError

logger = logging.getLogger(__name__)

#: Head dims the SageAttention v1 kernels are built for.
HEAD_DIMS = (64, 128)
#: The pinned release (setup.py extra ``sage``).
PACKAGE = "sageattention"

_LOGGED: set[tuple] = set()


def unavailable(device: str = "auto") -> str | None:
    """Why ``attention.kernel=sage`` cannot run for ``device`` (``auto``/``cuda``/``cpu``), or None."""
    if device == "cpu":
        return "device=cpu (SageAttention runs on CUDA only)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if importlib.util.find_spec(PACKAGE) is None:
        return f"the {PACKAGE} package is not installed"
    return None


def check_kernel(kernel: str, device: str = "auto") -> None:
    """One-line ``InputError`` (exit 2) when ``attention.kernel`` asks for SageAttention where it cannot run."""
    if str(kernel) != "sage":
        return
    why = unavailable(str(device))
    if why is not None:
        raise InputError(
            f"attention.kernel=sage needs CUDA and pip install avatar-launcher[sage], but {why}; "
            "use attention.kernel=sdpa"
        )


def accepts(q: torch.Tensor, key_mask: torch.Tensor | None) -> bool:
    """Whether a call can go to the kernel (else the facade runs SDPA)."""
    ok = key_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
    if not ok:
        key = (q.device.type, q.dtype, q.shape[-1], key_mask is not None)
        if key not in _LOGGED:
            _LOGGED.add(key)
            logger.info(
                "attention.kernel=sage: %s calls (head dim %d%s) run on SDPA",
                q.dtype,
                q.shape[-1],
                ", masked" if key_mask is not None else "",
            )
    return ok


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``sageattn`` on q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` (the facade's layout, ``NHD``); q's dtype out."""
    from sageattention import sageattn

    out = sageattn(
        q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout="NHD", is_causal=False, sm_scale=scale
    )
    return out.to(q.dtype)
