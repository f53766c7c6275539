"""Seam report on synthetic videos with a known jump."""

from __future__ import annotations

import numpy as np
import pytest

from avatar.pipeline.seams import SeamMeter


def seam_report(frames, boundaries):
    """The renderer's way: feed the meter the frames as they are written (a whole array or chunks), then report."""
    meter = SeamMeter(boundaries)
    for chunk in [frames] if isinstance(frames, np.ndarray) else frames:
        meter.add(chunk)
    return meter.report()


def _video(num_frames=60, jump_at=40, jump=30, seed=0):
    """Brightness rising by 1 per frame (plus a little per-pixel noise), and a jump of ``jump`` at ``jump_at``."""
    rng = np.random.default_rng(seed)
    levels = 50 + np.arange(num_frames) + jump * (np.arange(num_frames) >= jump_at)
    noise = rng.integers(0, 2, size=(num_frames, 8, 8, 3))
    return (levels[:, None, None, None] + noise).astype(np.uint8)


def test_known_jump_stands_out():
    frames = _video()
    report = seam_report(frames, [20, 40])
    assert [r["frame"] for r in report] == [20, 40]
    smooth, seam = report
    assert 0.5 < smooth["ratio"] < 2.0
    assert seam["seam_diff"] == pytest.approx(31, abs=1.0)
    assert seam["ratio"] > 10
    assert seam["interior_median"] == pytest.approx(1.0, abs=0.6)
    assert seam["num_interior"] == (60 - 20 - 1) - 1  # pairs inside frames 20..59, the seam pair excluded


def test_streamed_chunks_and_single_frames_give_the_same_report():
    frames = _video(seed=3)
    whole = seam_report(frames, [20, 40])
    chunks = seam_report((frames[i : i + 7] for i in range(0, len(frames), 7)), [20, 40])
    singles = seam_report(iter(list(frames)), [40, 20])
    assert whole == chunks == singles


def test_meter_keeps_only_the_previous_frame():
    meter = SeamMeter([10])
    frames = _video(num_frames=30)
    for i in range(0, 30, 4):
        meter.add(frames[i : i + 4])
    assert meter.previous.shape == (8, 8, 3)
    assert len(meter.diffs) == 29 and meter.num_frames == 30
    with pytest.raises(ValueError, match="shape"):
        meter.add(np.zeros((1, 4, 4, 3), dtype=np.uint8))


def test_boundaries_outside_the_video_and_static_video():
    frames = _video(num_frames=20, jump_at=100)
    assert [r["frame"] for r in seam_report(frames, [0, 10, 20, 50])] == [10]
    static = np.full((10, 4, 4, 3), 7, dtype=np.uint8)
    (entry,) = seam_report(static, [5])
    assert entry["seam_diff"] == 0.0 and entry["interior_median"] == 0.0 and entry["ratio"] is None
    assert seam_report(static[:1], [1]) == []
