"""The attention facade: every attention in the project goes through ``attention()``.

Local kernels: ``sdpa`` (torch scaled_dot_product_attention, the default and the reference), ``flash``
(FlashAttention-3 ``flash_attn_interface`` when installed, else flash-attn 2; ``avatar/attention/flash.py``) and
``sage`` (8-bit SageAttention for the mask-free fp16/bf16 calls, the rest on SDPA; ``avatar/attention/sage.py``,
whose ``check_kernel`` the validation calls).
Sequence-parallel backends (Ulysses, Ring, xfuser) live in ``avatar/parallel`` and call back into this facade for
their local blocks.

The default path never passes a mask: the callers know their lengths on the host and hand over exactly the tokens
that attend to each other (``avatar/parallel/base.py``). A mask disqualifies the fast CUDA kernels (FlashAttention
refuses any ``attn_mask``), so on CUDA the SDPA backend is chosen explicitly, the first that accepts the call in the
order of :data:`CUDA_SDPA_ORDER`, once per (device, dtype, head dim) and logged once:

1. cuDNN attention: the fastest SDPA kernel on Hopper for bf16/fp16 at head dim 128 (PyTorch's own cuDNN-SDPA
   figures on H100: ahead of FlashAttention-2 by up to ~1.7×);
2. FlashAttention-2 (torch's built-in flash): where cuDNN attention is unavailable (pre-Hopper builds, old cuDNN);
3. memory-efficient attention: fp32 inputs and any head dim;
4. math: the fallback that always runs.

``tests/gpu/check.sh`` times the backends on a device and prints the one chosen. On CPU SDPA is called plainly
(torch's CPU flash kernel for unmasked inputs).

Layout: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, key_mask ``[B, Sk]`` bool (True = may be attended; for callers
outside the default path only).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

KERNELS = ("sdpa", "flash", "sage")

#: The CUDA SDPA backends in the order tried (see the module docstring for why).
CUDA_SDPA_ORDER = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)

_CHOSEN: dict[tuple, SDPBackend] = {}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    kernel: str = "sdpa",
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention; returns ``[B, Sq, H, D]`` in q's dtype."""
    if kernel not in KERNELS:
        raise ValueError(f"attention.kernel={kernel!r} is not one of {KERNELS}")
    if kernel == "flash":
        from avatar.attention.flash import flash_attention

        return flash_attention(q, k, v, key_mask=key_mask, scale=scale)
    if kernel == "sage":
        from avatar.attention import sage

        if sage.accepts(q, key_mask):
            return sage.sage_attention(q, k, v, scale=scale)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == "cuda":
        return _cuda_sdpa(qt, kt, vt, mask, scale).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


def _cuda_sdpa(qt, kt, vt, mask, scale) -> torch.Tensor:
    """SDPA under the first backend of :data:`CUDA_SDPA_ORDER` that accepts these inputs (remembered per device,
    dtype, head dim and masking; the first choice is logged)."""
    key = (qt.device, qt.dtype, qt.shape[-1], vt.shape[-1], mask is not None)
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    errors = []
    for backend in CUDA_SDPA_ORDER:
        try:
            with warnings.catch_warnings(), sdpa_kernel(backend):
                warnings.simplefilter("ignore")  # torch warns why each refused backend cannot run
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
        except RuntimeError as err:  # "No available kernel": this backend refuses these inputs
            errors.append(f"{backend.name}: {str(err).splitlines()[0]}")
            continue
        _CHOSEN[key] = backend
        logger.info(
            "attention: SDPA backend %s for %s, head dim %d%s (tried in the order %s)",
            backend.name,
            str(qt.dtype).removeprefix("torch."),
            qt.shape[-1],
            ", with a mask" if mask is not None else "",
            ", ".join(b.name for b in CUDA_SDPA_ORDER),
        )
        return out
    raise RuntimeError("no SDPA backend accepts these inputs: " + "; ".join(errors))


def chosen_backends() -> dict[str, str]:
    """The CUDA SDPA backend chosen so far per ``dtype/head_dim`` (for reports and the GPU check)."""
    return {
        f"{str(k[1]).removeprefix('torch.')}/{k[2]}{'/masked' if k[4] else ''}": b.name for k, b in _CHOSEN.items()
    }
