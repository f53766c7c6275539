"""The decode stage split over all ranks by temporal *and* spatial tiles.

The tiles are the single-process tiled decode's (``avatar.models.vae``: temporal tiles ``plan_for_vae``, spatial
tiles ``spatial_plan_for_vae``); one (temporal, spatial) pair is a *piece*. ``plan_decode`` (pure) groups
consecutive temporal tiles into rounds of at least ``PIECES_PER_RANK`` pieces per rank where the video allows, and
deals each round's pieces to the ranks longest first (LPT: each piece to the rank with the least work in the round,
ties to the least work so far), with a piece's work taken as its decoded voxels (frames × latent height × latent
width; the decoder's cost is proportional to its output). After each round rank 0 gathers the decoded pieces,
blends them spatially and temporally in order exactly as the single-process decode does, and yields the frames that
are final. Rank 0 holds one round (fewer than ``2 · ceil(PIECES_PER_RANK · world / spatial tiles)`` temporal tiles)
and one blend overlap, so memory does not grow with the video length. Pieces travel in the VAE's dtype and are
blended in float32 on the CPU, on any world size, so the frames do not depend on the number of ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from avatar.models import vae as vae_mod
from avatar.pipeline.topology import Topology

log = logging.getLogger(__name__)

#: Pieces per rank a round aims at: enough that the longest-first deal evens out the unequal tiles (edge tiles,
#: the shorter last temporal tile); 3 keeps max/min load ≤ 1.5 for 1-24 ranks at 704×704 and 704×768.
PIECES_PER_RANK = 3


@dataclass(frozen=True)
class Piece:
    """One spatial tile of one temporal tile, decoded by ``rank``."""

    tile: int
    """Temporal tile index."""
    spatial: int
    """Spatial tile index (row-major)."""
    cost: int
    """Decoded voxels: frames × latent rows × latent columns."""
    rank: int


@dataclass(frozen=True)
class DecodePlan:
    """Who decodes which piece, round by round."""

    world: int
    tiles: tuple[vae_mod.Tile, ...]
    spatial: vae_mod.SpatialPlan
    rounds: tuple[tuple[int, ...], ...]
    """Temporal tile indices of each round, in order."""
    pieces: tuple[tuple[Piece, ...], ...]
    """Each round's pieces, in blend order (temporal tile, then spatial tile)."""

    def tiles_per_rank(self) -> list[int]:
        counts = [0] * self.world
        for round_pieces in self.pieces:
            for piece in round_pieces:
                counts[piece.rank] += 1
        return counts

    def load_per_rank(self) -> list[int]:
        loads = [0] * self.world
        for round_pieces in self.pieces:
            for piece in round_pieces:
                loads[piece.rank] += piece.cost
        return loads

    def balance(self) -> float | None:
        """max / min work per rank (None when a rank has nothing: more ranks than pieces)."""
        loads = self.load_per_rank()
        return max(loads) / min(loads) if min(loads) > 0 else None

    def round_efficiency(self) -> float:
        """Work / (world × sum over rounds of the busiest rank's work): 1.0 when no rank ever waits at a gather."""
        critical = 0
        for round_pieces in self.pieces:
            loads = [0] * self.world
            for piece in round_pieces:
                loads[piece.rank] += piece.cost
            critical += max(loads)
        return sum(self.load_per_rank()) / (self.world * critical) if critical else 1.0


def plan_decode(
    tiles: list[vae_mod.Tile], spatial: vae_mod.SpatialPlan, world: int, pieces_per_rank: int = PIECES_PER_RANK
) -> DecodePlan:
    """Deal the pieces of a tiled decode over ``world`` ranks (pure; every rank computes the same plan)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    per_tile = len(spatial.tiles)
    group = max(1, math.ceil(pieces_per_rank * world / per_tile))
    num_rounds = max(1, len(tiles) // group)
    bounds = [round(i * len(tiles) / num_rounds) for i in range(num_rounds + 1)]
    total = [0] * world
    rounds, dealt = [], []
    for r in range(num_rounds):
        members = tuple(range(bounds[r], bounds[r + 1]))
        work = []
        for t in members:
            frames = tiles[t].frame_stop - tiles[t].frame_start
            for s in spatial.tiles:
                work.append((frames * (s.y1 - s.y0) * (s.x1 - s.x0), t, s.index))
        in_round = [0] * world
        owner = {}
        # Longest first; equal costs in blend order, so the plan is deterministic.
        for cost, t, s in sorted(work, key=lambda w: (-w[0], w[1], w[2])):
            rank = min(range(world), key=lambda k: (in_round[k], total[k], k))
            in_round[rank] += cost
            total[rank] += cost
            owner[(t, s)] = rank
        rounds.append(members)
        dealt.append(tuple(Piece(t, s, cost, owner[(t, s)]) for cost, t, s in work))
    return DecodePlan(world, tuple(tiles), spatial, tuple(rounds), tuple(dealt))


def plan_for_latents(vae, latents_shape, world: int) -> DecodePlan:
    """The decode plan for VAE-space latents of ``latents_shape`` ``[1, C, T, h, w]`` with the VAE's settings."""
    tiles = vae_mod.plan_for_vae(vae, latents_shape[2])
    spatial = vae_mod.spatial_plan_for_vae(vae, latents_shape[3], latents_shape[4])
    return plan_decode(tiles, spatial, world)


@dataclass
class DecodeStats:
    """What the decodes of one render did, per rank (the run report's ``decode`` section)."""

    world: int = 1
    decodes: int = 0
    rounds: int = 0
    temporal_tiles: int = 0
    spatial_tiles: int = 0
    tiles_per_rank: list[int] = field(default_factory=list)
    load_per_rank: list[int] = field(default_factory=list)
    plans: list[DecodePlan] = field(default_factory=list)

    def add(self, plan: DecodePlan) -> None:
        if not self.tiles_per_rank:
            self.world = plan.world
            self.tiles_per_rank = [0] * plan.world
            self.load_per_rank = [0] * plan.world
        self.decodes += 1
        self.plans.append(plan)
        self.rounds += len(plan.rounds)
        self.temporal_tiles += len(plan.tiles)
        self.spatial_tiles = len(plan.spatial.tiles)
        self.tiles_per_rank = [a + b for a, b in zip(self.tiles_per_rank, plan.tiles_per_rank())]
        self.load_per_rank = [a + b for a, b in zip(self.load_per_rank, plan.load_per_rank())]

    def as_dict(self) -> dict:
        loads = self.load_per_rank
        balance = max(loads) / min(loads) if loads and min(loads) > 0 else None
        return {
            "world": self.world,
            "decodes": self.decodes,
            "rounds": self.rounds,
            "temporal_tiles": self.temporal_tiles,
            "spatial_tiles_per_temporal_tile": self.spatial_tiles,
            "tiles_per_rank": list(self.tiles_per_rank),
            "voxels_per_rank": list(loads),
            "max_min_load": None if balance is None else round(balance, 3),
            # 1.0 when no rank ever waits for the busiest one at a round's gather
            "round_efficiency": round(min(p.round_efficiency() for p in self.plans), 3) if self.plans else None,
        }


def distributed_decode_frames(
    vae, latents: torch.Tensor, topo: Topology, stats: DecodeStats | None = None
) -> Iterator[torch.Tensor]:
    """Decode VAE-space latents ``[1, C, T, h, w]``; yields float32 ``[n, 3, H, W]`` chunks in order on rank 0
    (nothing elsewhere). Every rank must call it with the same latents."""
    plan = plan_for_latents(vae, latents.shape, topo.world)
    if stats is not None:
        stats.add(plan)
    if topo.is_main:
        balance = plan.balance()
        log.info(
            "decode: %d temporal × %d spatial tiles in %d round(s) on %d rank(s), tiles per rank %s, max/min work %s",
            len(plan.tiles),
            len(plan.spatial.tiles),
            len(plan.rounds),
            plan.world,
            plan.tiles_per_rank(),
            "n/a (more ranks than tiles)" if balance is None else f"{balance:.2f}",
        )
    blender = vae_mod.TileBlender(vae_mod.blend_frames_of(vae))
    for members, round_pieces in zip(plan.rounds, plan.pieces):
        mine = {}
        for piece in round_pieces:
            if piece.rank == topo.rank:
                tile = plan.tiles[piece.tile]
                mine[(piece.tile, piece.spatial)] = vae_mod.decode_piece(
                    vae, latents, tile, plan.spatial.tiles[piece.spatial]
                ).cpu()
        gathered = topo.gather_to_main(mine)
        del mine
        if not topo.is_main:
            continue
        decoded = {}
        for part in gathered:
            decoded.update(part)
        del gathered
        for t in members:
            pieces = {s.index: decoded.pop((t, s.index)).float() for s in plan.spatial.tiles}
            frames = blender.push(plan.tiles[t], vae_mod.blend_spatial(plan.spatial, pieces))
            del pieces
            yield frames[0].permute(1, 0, 2, 3)
