"""Optional FlashAttention kernels (``attention.kernel=flash``); imported lazily, never required.

FlashAttention-3 (``flash_attn_interface``, the Hopper build of the flash-attention repository) when it imports,
else flash-attn 2 (``flash_attn``). The default path has no masks (host-known lengths, ``avatar/parallel/base.py``),
so it calls the dense kernels: no host sync. A caller that does pass a key mask gets the allowed keys of each batch
row packed into the varlen kernel (attention does not depend on key order; reading the longest row is a host sync).
Layout as in the facade: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, key_mask ``[B, Sk]`` bool.
"""

from __future__ import annotations

import torch

UNAVAILABLE = (
    "attention.kernel=flash needs flash-attn (FlashAttention-3 flash_attn_interface or flash-attn 2) on a CUDA "
    "device ({reason}); use attention.kernel=sdpa (torch's kernels, always available)"
)


def flash_module():
    """``(name, module)``: ``("fa3", flash_attn_interface)`` or ``("fa2", flash_attn)``; RuntimeError naming
    ``attention.kernel=sdpa`` when neither is usable."""
    if not torch.cuda.is_available():
        raise RuntimeError(UNAVAILABLE.format(reason="no CUDA device"))
    try:
        import flash_attn_interface

        return "fa3", flash_attn_interface
    except ImportError:
        pass
    try:
        import flash_attn
    except ImportError as err:
        raise RuntimeError(UNAVAILABLE.format(reason=f"import flash_attn failed: {err}")) from err
    return "fa2", flash_attn


def _with_lse(name: str, fn, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a flash kernel asking for its log-sum-exp (FA2: ``return_attn_probs``; FA3 releases return
    ``(out, lse)`` either always or with ``return_attn_probs``)."""
    if name == "fa2":
        out, lse, _ = fn(*args, return_attn_probs=True, **kwargs)
        return out, lse
    try:
        result = fn(*args, return_attn_probs=True, **kwargs)
    except TypeError:  # an FA3 release without the argument returns (out, lse) always
        result = fn(*args, **kwargs)
    return result[0], result[1]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with FlashAttention; returns ``[B, Sq, H, D]``."""
    return flash_attention_with_lse(q, k, v, key_mask=key_mask, scale=scale)[0]


def flash_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Sq, H, D], lse [B, H, Sq] fp32)``; fully masked rows give out 0 and lse −inf."""
    name, module = flash_module()
    if q.device.type != "cuda":
        raise RuntimeError(UNAVAILABLE.format(reason=f"tensors are on {q.device}"))
    batch, num_q, heads, _ = q.shape
    if key_mask is None:
        out, lse = _with_lse(name, module.flash_attn_func, q, k, v, softmax_scale=scale)
        return out, lse.float()
    key_mask = key_mask.to(torch.bool)
    counts = key_mask.sum(dim=1, dtype=torch.int32)
    cu_k = torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, dtype=torch.int32, device=q.device)
    out, lse = _with_lse(
        name,
        module.flash_attn_varlen_func,
        q.reshape(batch * num_q, heads, -1),
        k[key_mask],
        v[key_mask],
        cu_q,
        cu_k,
        num_q,
        int(counts.max()),
        softmax_scale=scale,
    )
    out = out.reshape(batch, num_q, heads, -1)
    if lse.dim() == 2:  # varlen lse as [H, total_q] (flash-attn >= 2.5, FA3); older releases [B, H, max_q]
        lse = lse.reshape(heads, batch, num_q).transpose(0, 1)
    lse = lse[..., :num_q].float()
    empty = counts == 0
    out = out.masked_fill(empty[:, None, None, None], 0.0)
    lse = lse.masked_fill(empty[:, None, None], float("-inf"))
    return out, lse
