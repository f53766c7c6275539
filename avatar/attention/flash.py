"""Optional flash-attn kernel (``attention.kernel=flash``); imported lazily, never required.

Key masks are honoured exactly by packing the allowed keys of each batch row into ``flash_attn_varlen_func``
(attention does not depend on key order). Layout as in the facade: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``,
key_mask ``[B, Sk]`` bool.
"""

from __future__ import annotations

import torch

UNAVAILABLE = (
    "attention.kernel=flash needs the flash-attn package on a CUDA device ({reason}); "
    "use attention.kernel=sdpa (torch's kernels, always available)"
)


def _flash_module():
    if not torch.cuda.is_available():
        raise RuntimeError(UNAVAILABLE.format(reason="no CUDA device"))
    try:
        import flash_attn
    except ImportError as err:
        raise RuntimeError(UNAVAILABLE.format(reason=f"import flash_attn failed: {err}")) from err
    return flash_attn


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with flash-attn; returns ``[B, Sq, H, D]``."""
    return flash_attention_with_lse(q, k, v, key_mask=key_mask, scale=scale)[0]


def flash_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Sq, H, D], lse [B, H, Sq] fp32)``; fully masked rows give out 0 and lse −inf."""
    flash_attn = _flash_module()
    if q.device.type != "cuda":
        raise RuntimeError(UNAVAILABLE.format(reason=f"tensors are on {q.device}"))
    batch, num_q, heads, _ = q.shape
    if key_mask is None:
        out, lse, _ = flash_attn.flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
        return out, lse.float()
    key_mask = key_mask.to(torch.bool)
    counts = key_mask.sum(dim=1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, dtype=torch.int32, device=q.device)
    out, lse, _ = flash_attn.flash_attn_varlen_func(
        q.reshape(batch * num_q, heads, -1),
        k[key_mask],
        v[key_mask],
        cu_q,
        cu_k,
        num_q,
        int(counts.max()),
        softmax_scale=scale,
        return_attn_probs=True,
    )
    out = out.reshape(batch, num_q, heads, -1)
    if lse.dim() == 2:  # flash-attn ≥ 2.5 gives varlen lse as [H, total_q]; older releases as [B, H, max_q]
        lse = lse.reshape(heads, batch, num_q).transpose(0, 1)
    lse = lse[..., :num_q].float()
    empty = counts == 0
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None, None], 0.0)
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, lse
