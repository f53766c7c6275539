"""Local attention with log-sum-exp against plain SDPA; LSE merging; the optional kernels' errors on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avatar.attention import attention
from avatar.attention.lse import attention_with_lse, merge_partials
from avatar.parallel.backends import build_sequence


def inputs(num_q: int = 6, num_k: int = 9, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, num_q, 3, 8, generator=gen).to(dtype)
    k = torch.randn(2, num_k, 3, 8, generator=gen).to(dtype)
    v = torch.randn(2, num_k, 3, 8, generator=gen).to(dtype)
    mask = torch.rand(2, num_k, generator=gen) > 0.4
    mask[:, 0] = True
    return q, k, v, mask


def explicit(q, k, v, mask, scale=None):
    """fp32 scores by hand: the definition the kernels must match."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float())
    return out, torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_lse_matches_sdpa_and_explicit_lse(masked):
    q, k, v, mask = inputs()
    mask = mask if masked else None
    out, lse = attention_with_lse(q, k, v, mask)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if mask is None else mask[:, None, None],
    ).transpose(1, 2)
    ref_out, ref_lse = explicit(q, k, v, mask)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 6)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, attention(q, k, v, key_mask=mask), rtol=1e-5, atol=1e-6)


def test_scale_is_honoured():
    q, k, v, mask = inputs()
    out, lse = attention_with_lse(q, k, v, mask, scale=0.3)
    ref_out, ref_lse = explicit(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_neutral_not_nan():
    q, k, v, mask = inputs()
    mask[1] = False
    out, lse = attention_with_lse(q, k, v, mask)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert torch.isfinite(lse[0]).all()


def test_merging_blocks_equals_attention_over_all_keys():
    q, k, v, mask = inputs(num_k=12)
    mask[1, 4:8] = False  # the middle block of row 1 fully masked
    merged_out = merged_lse = None
    for block in (slice(0, 4), slice(4, 8), slice(8, 12)):
        out, lse = attention_with_lse(q, k[:, block], v[:, block], mask[:, block])
        merged_out, merged_lse = merge_partials(merged_out, merged_lse, out, lse)
    ref_out, ref_lse = explicit(q, k, v, mask)
    torch.testing.assert_close(merged_out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged_lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_merging_only_masked_blocks_gives_zero():
    q, k, v, mask = inputs()
    mask[:] = False
    out, lse = attention_with_lse(q, k, v, mask)
    merged = merge_partials(*merge_partials(None, None, out, lse), out, lse)
    assert (merged[0] == 0).all() and torch.isneginf(merged[1]).all()


def test_bf16_lse_is_fp32_and_close():
    q, k, v, mask = inputs(dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, mask)
    ref_out, ref_lse = explicit(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_flash_kernel_error_names_sdpa():
    q, k, v, mask = inputs()
    with pytest.raises(RuntimeError, match="attention.kernel=sdpa"):
        attention(q, k, v, key_mask=mask, kernel="flash")
    with pytest.raises(RuntimeError, match="attention.kernel=sdpa"):
        attention_with_lse(q, k, v, mask, kernel="flash")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_xfuser_backend_error_names_native():
    with pytest.raises(RuntimeError, match="attention.backend=native") as info:
        build_sequence(backend="xfuser")
    assert "cannot run here" in str(info.value)


def test_unknown_backend_and_kernel_rejected():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="attention.backend='ring'"):
        build_sequence(backend="ring")
    with pytest.raises(ValueError, match="attention.kernel='xla'"):
        attention_with_lse(q, k, v, kernel="xla")
