"""The attention facade: every attention in the project goes through ``attention()``.

Local kernels: ``sdpa`` (torch scaled_dot_product_attention, the default and the reference) and ``flash``
(flash-attn when installed). Sequence-parallel backends (Ulysses, Ring, xfuser) live in ``avatar/parallel`` and call
back into this facade for their local blocks.

Layout: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, key_mask ``[B, Sk]`` bool (True = may be attended).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("sdpa", "flash")


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
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)
