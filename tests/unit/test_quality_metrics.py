"""PSNR and SSIM of ``avatar.perf`` (the bench and the GPU quality script report them): equal frames give inf and 1,
noise lowers both, a shape mismatch is refused."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.perf import psnr, ssim


def test_equal_frames_and_noise():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert psnr(frames, frames) == float("inf") and ssim(frames, frames) == pytest.approx(1.0)
    noisy = np.clip(frames.astype(int) + rng.integers(-8, 9, frames.shape), 0, 255).astype(np.uint8)
    worse = np.clip(frames.astype(int) + rng.integers(-40, 41, frames.shape), 0, 255).astype(np.uint8)
    assert 25 < psnr(noisy, frames) < 45 and psnr(worse, frames) < psnr(noisy, frames)
    assert ssim(worse, frames) < ssim(noisy, frames) < 1.0
    mse = ((noisy.astype(float) - frames) ** 2).mean()
    assert psnr(noisy, frames) == pytest.approx(10 * np.log10(255**2 / mse))
    with pytest.raises(ValueError):
        psnr(frames[:1], frames)
