"""The distributed decode's piece plan (pure): every piece dealt once, balanced work, bounded rounds."""

from __future__ import annotations

import pytest

from avatar.models.vae import plan_spatial_tiles, plan_temporal_tiles, whole_frame_plan
from avatar.pipeline.decode import DecodeStats, plan_decode

# Official tiling: temporal 64 frames stride 48 (16/12 latents), spatial 256 px stride 192 (32/24 latents).
OFFICIAL = dict(tile=32, stride=24, ratio=8)


def official_plan(height_px: int, width_px: int, frames: int, world: int):
    latents = (frames - 1) // 4 + 1
    tiles = plan_temporal_tiles(latents, 16, 12)
    spatial = plan_spatial_tiles(height_px // 8, width_px // 8, **OFFICIAL)
    return plan_decode(tiles, spatial, world)


def test_official_geometry_is_diffusers_tiles():
    spatial = plan_spatial_tiles(88, 96, **OFFICIAL)  # 704 × 768
    assert (spatial.rows, spatial.cols) == (4, 4)
    assert [(t.y0, t.y1) for t in spatial.tiles if t.col == 0] == [(0, 32), (24, 56), (48, 80), (72, 88)]
    assert [(t.x0, t.x1) for t in spatial.tiles if t.row == 0] == [(0, 32), (24, 56), (48, 80), (72, 96)]
    assert spatial.blend == (64, 64) and spatial.keep == (192, 192) and spatial.size == (704, 768)


@pytest.mark.parametrize("size", [(704, 704), (704, 768)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8, 16, 24])
def test_every_rank_decodes_with_balanced_work(size, world):
    plan = official_plan(*size, 129, world)
    dealt = [(p.tile, p.spatial) for pieces in plan.pieces for p in pieces]
    assert len(plan.tiles) == 3 and len(plan.spatial.tiles) == 16
    assert sorted(dealt) == [(t, s) for t in range(3) for s in range(16)]  # every piece exactly once
    assert [t for r in plan.rounds for t in r] == [0, 1, 2]  # rounds in order, each tile in one round
    assert all(count > 0 for count in plan.tiles_per_rank())
    assert plan.balance() <= 1.5, (plan.load_per_rank(), plan.tiles_per_rank())
    # ranks rarely wait for each other at a round's gather
    assert plan.round_efficiency() >= 0.85
    assert sum(plan.tiles_per_rank()) == 48
    if world <= 8:
        assert plan.balance() <= 1.1
    if world <= 16:
        assert plan.balance() <= 1.15


def test_rounds_stay_bounded_for_long_videos():
    # 60 s of video: rank 0 holds one round, whose size does not grow with the length.
    for world in (1, 4, 8):
        plan = official_plan(704, 768, 60 * 25 + 1, world)
        assert len(plan.tiles) > 30
        largest = max(len(r) for r in plan.rounds)
        assert largest <= 2 * -(-3 * world // 16), (world, largest)
        assert plan.balance() <= 1.5


def test_untiled_frames_split_by_temporal_tiles_only():
    plan = plan_decode(plan_temporal_tiles(33, 16, 12), whole_frame_plan(8, 8), world=4)
    assert plan.tiles_per_rank() == [1, 1, 1, 0]
    assert plan.balance() is None
    stats = DecodeStats()
    stats.add(plan)
    stats.add(plan)
    assert stats.as_dict()["tiles_per_rank"] == [2, 2, 2, 0] and stats.as_dict()["max_min_load"] is None
    # one round of three equal tiles on four ranks: the fourth rank idles a quarter of the time
    assert stats.as_dict()["round_efficiency"] == pytest.approx(plan.round_efficiency(), abs=1e-3)
    assert stats.as_dict()["round_efficiency"] < 1.0


def test_bad_world_is_refused():
    with pytest.raises(ValueError, match="world"):
        plan_decode(plan_temporal_tiles(9, 4, 3), whole_frame_plan(8, 8), world=0)
