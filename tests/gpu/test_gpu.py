"""Tier 3: needs CUDA (skipped cleanly without it). The tiny model through the real entry point on NCCL: 2 ranks
equal one process; the xfuser backend (when installed) against ours; bf16 against fp32 within tolerance."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.e2e.conftest import generate, tiny_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _frames(path):
    from tests.utils.video import read_frames

    return read_frames(str(path))


def _render(weights, out, *extra, nproc=1):
    result = generate(*tiny_args(weights, out, None, "device=cuda", "sampling.fidelity=fp32", *extra), nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return _frames(out)


@pytest.mark.timeout(600)
def test_nccl_two_ranks_equal_one(tiny_weights, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one = _render(tiny_weights, tmp_path / "one.mp4", "dtype=fp32")
    two = _render(tiny_weights, tmp_path / "two.mp4", "dtype=fp32", "parallel.ulysses=2", "parallel.cfg=1", nproc=2)
    np.testing.assert_array_equal(two, one)


@pytest.mark.timeout(600)
def test_bf16_close_to_fp32(tiny_weights, tmp_path):
    fp32 = _render(tiny_weights, tmp_path / "fp32.mp4", "dtype=fp32").astype(np.float32)
    bf16 = _render(tiny_weights, tmp_path / "bf16.mp4", "dtype=bf16").astype(np.float32)
    assert np.abs(fp32 - bf16).mean() < 8.0


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("xfuser") is None, reason="xfuser not installed (extra [xdit])")
def test_xfuser_backend_matches_ours(tiny_weights, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ours = _render(tiny_weights, tmp_path / "ours.mp4", "dtype=bf16", "parallel.ulysses=2", "parallel.cfg=1", nproc=2)
    xdit = _render(
        tiny_weights,
        tmp_path / "xdit.mp4",
        "dtype=bf16",
        "parallel.ulysses=2",
        "parallel.cfg=1",
        "attention.backend=xfuser",
        nproc=2,
    ).astype(np.float32)
    assert np.abs(xdit - ours.astype(np.float32)).mean() < 4.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sdpa_backend_is_chosen_explicitly_and_matches_math(dtype):
    """The facade picks the first CUDA SDPA backend of its order that accepts unmasked inputs (bf16 at head dim 128:
    cuDNN or flash, never the math fallback) and matches the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from avatar.attention import attention, chosen_backends

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 128, device="cuda", generator=gen).to(dtype) for _ in range(3))
    out = attention(q, k, v)
    chosen = chosen_backends()[f"{str(dtype).removeprefix('torch.')}/128"]
    if dtype == torch.bfloat16:
        assert chosen in ("CUDNN_ATTENTION", "FLASH_ATTENTION"), chosen
    assert chosen != "MATH"
    with sdpa_kernel(SDPBackend.MATH):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
        ).transpose(1, 2)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
