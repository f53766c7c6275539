"""Local attention that also returns the log-sum-exp of each query's scores, for merging partial blocks (Ring).

Layout: q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, key_mask ``[B, Sk]`` bool (True = may be attended). Returns
``(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] fp32)``. A query whose keys are all masked gets ``out = 0`` and
``lse = -inf``, so merging it with other blocks leaves them unchanged (and never produces NaN).

Kernels: on CPU ``aten._scaled_dot_product_flash_attention_for_cpu`` (a key mask goes in as an additive 0/−inf mask
of q's dtype, the only mask form it accepts); on CUDA the flash op without a mask (fp16/bf16) or the
memory-efficient op with an additive bias; ``kernel="flash"`` uses flash-attn (``avatar/attention/flash.py``).
"""

from __future__ import annotations

import torch

KERNELS = ("sdpa", "flash")


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    kernel: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its fp32 log-sum-exp (see the module docstring for shapes)."""
    if kernel == "sage":  # SageAttention returns no log-sum-exp: these blocks run on SDPA
        kernel = "sdpa"
    if kernel not in KERNELS:
        raise ValueError(f"attention.kernel={kernel!r} is not one of {KERNELS}")
    if key_mask is not None and q.device.type == "cpu" and bool(key_mask.all()):
        key_mask = None  # the unmasked CPU kernel is faster (on CUDA this check would cost a host sync)
    if kernel == "flash":
        from avatar.attention.flash import flash_attention_with_lse

        return flash_attention_with_lse(q, k, v, key_mask=key_mask, scale=scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]
    if q.device.type == "cuda":
        out, lse = _cuda_sdpa_with_lse(qt, kt, vt, key_mask, scale)
    else:
        bias = None if key_mask is None else _additive_mask(key_mask, q.dtype)[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt.contiguous(), kt.contiguous(), vt.contiguous(), attn_mask=bias, scale=scale
        )
    lse = lse.float()
    if key_mask is not None:
        # Fully masked rows: the kernels return lse 0 (CPU) or garbage; make them neutral in a merge.
        # (masked_fill on every call rather than a data-dependent branch: no host sync on CUDA.)
        empty = ~key_mask.any(dim=1)
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out.transpose(1, 2), lse


def _additive_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Sk]`` bool → 0 where allowed, −inf where masked, in ``dtype``."""
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~key_mask.to(torch.bool), float("-inf"))


def _cuda_sdpa_with_lse(qt, kt, vt, key_mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA: flash op when unmasked in half precision, else memory-efficient attention with an additive bias."""
    batch, heads, num_q, _ = qt.shape
    if key_mask is None and qt.dtype in (torch.float16, torch.bfloat16):
        result = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)
        return result[0], result[1]
    bias = None
    if key_mask is not None:
        num_k = kt.shape[2]
        # The efficient kernel wants the bias rows 16-element aligned: allocate padded, slice, broadcast.
        padded = -(-num_k // 16) * 16
        storage = torch.zeros(batch, 1, 1, padded, dtype=qt.dtype, device=qt.device)
        storage[..., :num_k] = _additive_mask(key_mask, qt.dtype)[:, None, None, :]
        bias = storage[..., :num_k].expand(batch, heads, num_q, num_k)
    result = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, bias, True, scale=scale)
    return result[0], result[1][..., :num_q]


def merge_partials(
    out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's ``(out [B, S, H, D], lse [B, H, S])`` into the running fp32 pair (None: first block).
    Exact softmax combination; blocks with lse −inf contribute nothing."""
    block_out = block_out.float()
    block_lse = block_lse.float()
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    # Where every block so far is fully masked new_lse is −inf: shift by 0 instead, so both weights are exp(−inf)=0.
    shift = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    old_weight = torch.exp(lse - shift).transpose(1, 2).unsqueeze(-1)
    new_weight = torch.exp(block_lse - shift).transpose(1, 2).unsqueeze(-1)
    return out * old_weight + block_out * new_weight, new_lse
