"""The VAE decode split over 4 gloo ranks by temporal and spatial tiles gives the frames of one process, every rank
decoding its share of the pieces (``avatar.pipeline.decode``). That one process equals diffusers' own tiled decode is
``tests/unit/test_vae.py``."""

from __future__ import annotations

import pytest
import torch

from tests.utils.spawn import spawn

# The tiny model's config with small spatial tiles (config values): 32 px frames in 2 × 2 tiles of 24 px.
OVERRIDES = ["model=tiny", "model.vae_tile_size=24", "model.vae_tile_stride=16"]
FRAMES = 129  # 33 latents: 6 temporal tiles of the tiny config (32 frames every 24)


def latents() -> torch.Tensor:
    return torch.randn(1, 4, (FRAMES - 1) // 4 + 1, 4, 4, generator=torch.Generator().manual_seed(3))


def decode(vae_dir, model_cfg, topo):
    from avatar.models.vae import configure_tiling, load_vae
    from avatar.pipeline.decode import DecodeStats, distributed_decode_frames

    vae = load_vae(vae_dir, dtype=torch.float32)
    configure_tiling(vae, model_cfg)
    stats = DecodeStats()
    chunks = list(distributed_decode_frames(vae, latents(), topo, stats))
    return (torch.cat(chunks) if chunks else None), stats.as_dict()


def worker(rank: int, world: int, vae_dir, cfg):
    from avatar.plan import resolve_plan

    topo, _ = resolve_plan(cfg, world).build_mesh("cpu").topologies(rank, torch.device("cpu"), cfg.attention)
    return decode(vae_dir, cfg.model, topo)


@pytest.mark.timeout(300)
def test_four_ranks_decode_spatial_and_temporal_tiles_like_one(tmp_path):
    from avatar.pipeline.topology import Topology
    from avatar.weights.tiny_cond import make_tiny_vae
    from avatar.compose import compose

    cfg = compose(OVERRIDES)
    vae_dir = make_tiny_vae(tmp_path, cfg.model, seed=2)
    results = spawn(4, worker, vae_dir, cfg, timeout=280)
    reference, one = decode(vae_dir, cfg.model, Topology())
    frames, stats = results[0]
    assert reference.shape == (FRAMES, 3, 32, 32)
    assert torch.equal(frames, reference)
    assert all(r[0] is None for r in results[1:])  # frames only on rank 0
    assert stats["temporal_tiles"] == 6 and stats["spatial_tiles_per_temporal_tile"] == 4
    assert len(stats["tiles_per_rank"]) == 4 and all(n >= 5 for n in stats["tiles_per_rank"])
    assert sum(stats["tiles_per_rank"]) == 24 and stats["max_min_load"] <= 1.5
    assert one["tiles_per_rank"] == [24]
