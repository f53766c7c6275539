"""The deep cache (``avatar/pipeline/cache.py``): the official write/read order, the write steps, and its memory
bound at the real size (meta tensors of the real buffer shapes, no allocation)."""

from __future__ import annotations

import math

import pytest
import torch

from avatar.compose import compose
from avatar.models.transformer import CachedInput
from avatar.pipeline import schedule as sched
from avatar.pipeline import strategies as strat
from avatar.pipeline.cache import CachePlan, DeepCache, FrameBuffer, live_bytes


def _window_input(frames: list[int], tokens: int = 2, width: int = 3, text: int = 2) -> CachedInput:
    """A cache write whose image rows hold their absolute frame index and whose ref/txt rows hold the window's
    first frame, so reads show which write they came from."""
    img = torch.stack([torch.full((tokens, width), -1.0)] + [torch.full((tokens, width), float(k)) for k in frames])
    txt = torch.full((text, width), 100.0 + frames[0])
    return CachedInput(img=img[None], txt=txt[None])


def test_plan_writes_only_before_cached_steps():
    plan = CachePlan.for_steps(50, True)
    assert plan.reuse_steps == sched.cached_steps(50)
    assert plan.write_steps == {15, 20, 25, 30, 35}
    assert [plan.mode(s) for s in (0, 14, 15, 16, 19, 20, 21, 40, 49)] == [
        None,
        None,
        "store",
        "reuse",
        "reuse",
        "store",
        "reuse",
        None,
        None,
    ]
    assert CachePlan.for_steps(50, False).write_steps == frozenset()


def test_later_window_wins_on_wrapped_frames_and_reads_take_the_first_frames_heads():
    buffer = FrameBuffer(5)
    # Two windows of 3 over 5 frames (circular): window 1 wraps onto frame 0.
    buffer.write(0, [0, 1, 2], _window_input([0, 1, 2]))
    buffer.write(1, [3, 4, 0], _window_input([3, 4, 0]))
    got = buffer.read([4, 0, 1])
    assert got.img[0, 1:, 0, 0].tolist() == [4.0, 0.0, 1.0]
    # Frame 4 was last written by window 1, whose first frame was 3: its ref/txt rows.
    assert got.txt[0, 0, 0].item() == 103.0
    assert buffer.read([1, 2, 3]).txt[0, 0, 0].item() == 100.0
    assert buffer.read([0, 1, 2]).txt[0, 0, 0].item() == 103.0  # slot 0 was overwritten by window 1
    assert set(buffer.heads) == {0, 1}
    buffer.write(2, [0, 1, 2], _window_input([0, 1, 2]))
    buffer.write(3, [2, 3, 4], _window_input([2, 3, 4]))
    assert set(buffer.heads) == {2, 3}  # heads no slot refers to any more are dropped
    with pytest.raises(RuntimeError, match="before any full step"):
        FrameBuffer(3).read([0, 1, 2])


def test_staged_writes_apply_in_window_order():
    cache = DeepCache(CachePlan.for_steps(20, True), 4)
    cache.stage(0, 1, [2, 3, 0], _window_input([2, 3, 0]))
    cache.stage(0, 0, [0, 1, 2], _window_input([0, 1, 2]))
    cache.commit()
    assert cache.read(0, [0, 1, 2]).img[0, 1:, 0, 0].tolist() == [0.0, 1.0, 2.0]  # window 1 wrote 0 and 2 last
    assert cache.read(0, [0, 1, 2]).txt[0, 0, 0].item() == 102.0
    cache.free()
    assert cache.nbytes == 0


@pytest.mark.parametrize("seconds", [5, 20, 60])
@pytest.mark.parametrize("sp", [1, 2, 8])
def test_cache_bytes_per_rank_at_full_width(seconds, sp):
    """704×768, bf16: the image rows are frames × tokens per frame × width × 2 bytes / sp, for both branches (one
    per rank under CFG-parallel), plus one reference + text block per window still referenced."""
    cfg = compose(["model=hunyuan_avatar"])
    m = cfg.model
    plan = strat.make("shift", m, seconds * 25, 0, "official")
    tokens = (704 // m.vae_spatial_ratio // 2) * (768 // m.vae_spatial_ratio // 2)
    per_rank = math.ceil(tokens / sp)
    width, text = m.hidden_size, m.text_len
    for branches in ([0, 1], [1]):
        cache = DeepCache(CachePlan.for_steps(50, True), plan.domain)
        for index, frames in enumerate(plan.windows(15)):
            for b in branches:
                img = torch.empty(1, len(frames) + 1, per_rank, width, dtype=torch.bfloat16, device="meta")
                txt = torch.empty(1, text, width, dtype=torch.bfloat16, device="meta")
                cache.stage(b, index, frames, CachedInput(img=img, txt=txt))
        cache.commit()
        image = plan.domain * per_rank * width * 2 * len(branches)
        heads = plan.windows_per_step * (per_rank + text) * width * 2 * len(branches)
        assert cache.image_nbytes == image
        assert cache.nbytes == image + heads
        assert cache.stats.peak_bytes == image + heads
        cache.free()
    if seconds == 5 and sp == 1:
        assert plan.domain == 33 and image == 33 * 2112 * 3072 * 2  # 0.43 GB per branch at one rank


def test_live_bytes_count_only_caches_not_freed():
    start = live_bytes()
    a = DeepCache(CachePlan.for_steps(20, True), 3)
    a.stage(0, 0, [0, 1, 2], _window_input([0, 1, 2]))
    a.commit()
    assert live_bytes() == start + a.nbytes > start
    a.free()
    assert live_bytes() == start
