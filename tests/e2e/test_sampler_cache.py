"""The deep cache through the real entry point (tiny model, 20 steps: cached steps 7, 9, 11, 13, 15): the report's
cache bytes are exactly the buffer arithmetic, a ``segments`` render holds one segment's cache at a time (each is
freed when its segment ends), and a CFG-parallel rank holds only its branch."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import generate, tiny_args

pytestmark = pytest.mark.slow
STEPS, CACHED = 20, 5


def _render(weights, out, *extra, nproc=1) -> dict:
    result = generate(
        *tiny_args(weights, out, None, f"sampling.steps={STEPS}", "model.image_size=64", *extra),
        nproc=nproc,
        timeout=500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.with_name(out.name + ".json").read_text())


def _sizes(report) -> tuple[int, int, int, int]:
    """(tokens per frame, width, text tokens, bytes per element) of the tiny model at the report's resolution."""
    from avatar.compose import compose
    from avatar.models.text import text_seq_len

    m = compose(["model=tiny"]).model
    width, height = report["resolution"]
    tokens = (width // m.vae_spatial_ratio // 2) * (height // m.vae_spatial_ratio // 2)
    return tokens, m.hidden_size, text_seq_len(m), 4  # fp32 on CPU


@pytest.mark.timeout(600)
def test_segments_hold_one_segment_cache_at_a_time(tiny_weights, tmp_path):
    report = _render(tiny_weights, tmp_path / "seg.mp4", "long.strategy=segments")
    d = report["denoise"]
    num_segments = len(d["windows"])
    assert num_segments >= 3
    window = d["windows"][0]["latents"]
    tokens, width, text, nbytes = _sizes(report)
    per_branch_image = window * tokens * width * nbytes
    per_branch = per_branch_image + (tokens + text) * width * nbytes
    # Both branches of one segment, not of all segments: each segment's cache is freed when it ends.
    assert d["cache_image_bytes_per_rank"] == 2 * per_branch_image
    assert d["cache_bytes_per_rank"] == 2 * per_branch
    assert (d["window_calls"], d["cached_window_calls"]) == (STEPS * num_segments, CACHED * num_segments)
    assert (d["forwards"], d["cached_forwards"]) == (2 * STEPS * num_segments, 2 * CACHED * num_segments)


@pytest.mark.timeout(600)
def test_shift_cache_bytes_per_rank_one_and_cfg_parallel(tiny_weights, tmp_path):
    one = _render(tiny_weights, tmp_path / "one.mp4", "long.strategy=shift")
    two = _render(tiny_weights, tmp_path / "two.mp4", "long.strategy=shift", "parallel.cfg=2", nproc=2)
    tokens, width, text, nbytes = _sizes(one)
    for report, branches in ((one, 2), (two, 1)):
        d = report["denoise"]
        image = d["infer_length"] * tokens * width * nbytes * branches
        heads = d["windows_per_step"] * (tokens + text) * width * nbytes * branches
        assert d["cache_image_bytes_per_rank"] == image
        assert d["cache_bytes_per_rank"] == image + heads
        assert d["cached_window_calls"] == CACHED * d["windows_per_step"]
        assert d["forwards"] == branches * STEPS * d["windows_per_step"]
    assert two["plan"]["cfg"] == 2
