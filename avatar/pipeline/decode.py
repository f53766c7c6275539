"""The decode stage split over all ranks by temporal tiles.

The tile plan is the single-process tiled decode's (``avatar.models.vae.plan_for_vae``). Tiles are dealt out in
rounds of ``world`` (tile ``i`` to rank ``i % world``); after each round rank 0 gathers the decoded tiles, blends
them in order exactly as the single-process decode does, and yields the frames that are final. Rank 0 holds at most
one round of tiles and one blend overlap, so memory does not grow with the video length.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from avatar.models import vae as vae_mod
from avatar.pipeline.topology import Topology


def distributed_decode_frames(vae, latents: torch.Tensor, topo: Topology) -> Iterator[torch.Tensor]:
    """Decode VAE-space latents ``[1, C, T, h, w]``; yields float32 ``[n, 3, H, W]`` chunks in order on rank 0
    (nothing elsewhere). Every rank must call it with the same latents."""
    tiles = vae_mod.plan_for_vae(vae, latents.shape[2])
    blender = vae_mod.TileBlender(vae_mod.blend_frames_of(vae))
    world = topo.world
    for first in range(0, len(tiles), world):
        round_tiles = tiles[first : first + world]
        mine = {}
        for tile in round_tiles:
            if tile.index % world == topo.rank:
                mine[tile.index] = vae_mod.decode_tile(vae, latents, tile).float().cpu()
        gathered = topo.gather_to_main(mine)
        if not topo.is_main:
            continue
        decoded = {}
        for part in gathered:
            decoded.update(part)
        for tile in round_tiles:
            frames = blender.push(tile, decoded.pop(tile.index))
            yield frames[0].permute(1, 0, 2, 3)
