"""The HunyuanVideo VAE (diffusers ``AutoencoderKLHunyuanVideo``, official keys 1:1) and our temporal + spatial tiling.

Decoding follows diffusers' own temporal tiling exactly (``_temporal_tiled_decode``: tiles of ``tile + 1`` latent
frames every ``stride`` latents, the first decoded frame of later tiles dropped, a linear cross-fade over
``(tile - stride) · ratio`` frames), but as plain functions over a tile plan, so that

- tiles can be decoded anywhere (``decode_tiles`` takes any subset of tile indices, e.g. one share per rank) and
  blended afterwards in order (``blend_and_emit``) with the identical result, and
- a streaming decode (``iter_decoded_frames``) emits frames as soon as their blend is final, holding one tile and the
  previous tile's overlap only.

Spatial tiling inside a temporal tile is diffusers' ``tiled_decode`` (same condition, tiles, in-place blending
order), also as plain functions: ``spatial_plan_for_vae`` plans the tiles, ``decode_piece`` decodes one (temporal,
spatial) piece anywhere and ``blend_spatial`` assembles a temporal tile from its pieces, so the distributed decode
(``avatar/pipeline/decode.py``) can spread pieces over every rank.
Latents given to the decode functions are in the VAE's own space: divide DiT latents by the scaling factor first
(``to_vae_space``).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar.config import ModelConfig
from avatar.io.errors import InputError

log = logging.getLogger(__name__)

OFFICIAL_VAE_FILE = "pytorch_model.pt"
_OFFICIAL_CONFIG_RENAMES = {"time_compression_ratio": "temporal_compression_ratio"}


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _diffusers_config(raw: dict) -> dict:
    """Map an official ``AutoencoderKLCausal3D`` config.json (or a diffusers one) to diffusers' constructor."""
    from diffusers import AutoencoderKLHunyuanVideo

    accepted = set(inspect.signature(AutoencoderKLHunyuanVideo.__init__).parameters) - {"self"}
    config = {}
    for key, value in raw.items():
        key = _OFFICIAL_CONFIG_RENAMES.get(key, key)
        if key in accepted:
            config[key] = value
    num_blocks = len(config.get("block_out_channels", (128, 256, 512, 512)))
    # The official block class names (DownEncoderBlockCausal3D, ...) are the same blocks under diffusers' names.
    config["down_block_types"] = ["HunyuanVideoDownBlock3D"] * num_blocks
    config["up_block_types"] = ["HunyuanVideoUpBlock3D"] * num_blocks
    config.setdefault("spatial_compression_ratio", 2 ** (num_blocks - 1))
    ignored = sorted(k for k in raw if _OFFICIAL_CONFIG_RENAMES.get(k, k) not in accepted and not k.startswith("_"))
    if ignored:
        log.debug("VAE config keys without a diffusers counterpart: %s", ignored)
    return config


def load_vae(vae_dir: str | Path, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu"):
    """Load the VAE from the official folder (``pytorch_model.pt`` + ``config.json``) or a diffusers
    ``save_pretrained`` folder. The official state dict may sit under ``'state_dict'`` with a ``vae.`` prefix; it is
    loaded strictly."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae_dir = Path(vae_dir)
    config_path = vae_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"vae: {vae_dir} has no config.json; expected the official vae/ folder or a diffusers one")
    official = vae_dir / OFFICIAL_VAE_FILE
    if not official.is_file():
        vae = AutoencoderKLHunyuanVideo.from_pretrained(vae_dir, torch_dtype=dtype)
        return vae.to(device).eval()

    config = _diffusers_config(json.loads(config_path.read_text()))
    from avatar.weights.files import safe_torch_load

    checkpoint = safe_torch_load(official)
    state = checkpoint.get("state_dict", checkpoint)
    state = {k.removeprefix("vae."): v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanVideo(**config)
    vae.load_state_dict(state, strict=True, assign=True)
    log.info("loaded VAE %s (%d tensors)", official, len(state))
    return vae.to(device).eval()


def configure_tiling(vae, cfg: ModelConfig) -> None:
    """Set the official tiling (temporal 64 frames stride 48, spatial 256 px stride 192 at full size)."""
    vae.enable_tiling(
        tile_sample_min_height=cfg.vae_tile_size,
        tile_sample_min_width=cfg.vae_tile_size,
        tile_sample_min_num_frames=cfg.vae_tile_frames,
        tile_sample_stride_height=cfg.vae_tile_stride,
        tile_sample_stride_width=cfg.vae_tile_stride,
        tile_sample_stride_num_frames=cfg.vae_tile_stride_frames,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Reference latents


def reference_pixels(image, num_frames: int) -> torch.Tensor:
    """A PIL RGB image (or uint8 ``[H, W, 3]`` array) as ``[1, 3, num_frames, H, W]`` in [-1, 1] (pixels/127.5 - 1)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    pixels = array.permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels[None, :, None].expand(1, 3, num_frames, *pixels.shape[1:]).contiguous()


@torch.no_grad()
def encode_reference(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE-encode ``[1, 3, F, H, W]`` pixels in [-1, 1]: a posterior sample drawn with ``generator`` (official), or
    the posterior mean without one, times the scaling factor. Returns float32 ``[1, C, (F-1)/4+1, H/8, W/8]``."""
    param = next(vae.parameters())
    posterior = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    latents = posterior.sample(generator=generator) if generator is not None else posterior.mode()
    return latents.float() * vae.config.scaling_factor


def to_vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """DiT latents (scaled) → the VAE decoder's input."""
    return latents / vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------------------------------
# Temporal tiling


@dataclass(frozen=True)
class Tile:
    """One temporal decode tile. Frame numbers are output-video frames."""

    index: int
    latent_start: int
    latent_stop: int
    frame_start: int
    """Output frame of the tile's first kept decoded frame (later tiles drop their first decoded frame)."""
    frame_stop: int
    """One past the tile's last decoded frame."""
    emit_stop: int
    """Frames ``[frame_start, emit_stop)`` are final once this tile has been blended with the previous one."""


def plan_temporal_tiles(
    num_latent_frames: int, tile_latents: int, stride_latents: int, temporal_ratio: int = 4
) -> list[Tile]:
    """Temporal tiles as diffusers' ``_temporal_tiled_decode`` makes them (pure).

    More than ``tile_latents`` latent frames: a tile of ``tile_latents + 1`` latents starts every ``stride_latents``;
    otherwise one tile holds everything. Tiles that would decode to no kept frame are left out (they contribute
    nothing in diffusers either).
    """
    if not 0 < stride_latents <= tile_latents:
        raise InputError(f"VAE tiling: stride {stride_latents} must be in 1..tile {tile_latents} latent frames")
    num_frames = (num_latent_frames - 1) * temporal_ratio + 1
    if num_latent_frames <= tile_latents:
        return [Tile(0, 0, num_latent_frames, 0, num_frames, num_frames)]
    spans = []
    for start in range(0, num_latent_frames, stride_latents):
        stop = min(start + tile_latents + 1, num_latent_frames)
        first = 0 if start == 0 else start * temporal_ratio + 1
        last = (stop - 1) * temporal_ratio + 1
        if last > first:
            spans.append((start, stop, first, last))
    tiles = []
    for index, (start, stop, first, last) in enumerate(spans):
        emit_stop = spans[index + 1][2] if index + 1 < len(spans) else last
        tiles.append(Tile(index, start, stop, first, last, emit_stop))
    return tiles


def plan_for_vae(vae, num_latent_frames: int) -> list[Tile]:
    """The tile plan the VAE's current settings give (``enable_tiling`` / ``use_framewise_decoding``)."""
    ratio = vae.temporal_compression_ratio
    if vae.tile_sample_min_num_frames % ratio or vae.tile_sample_stride_num_frames % ratio:
        raise InputError(
            f"VAE tiling: tile {vae.tile_sample_min_num_frames} and stride {vae.tile_sample_stride_num_frames} "
            f"frames must be multiples of the temporal ratio {ratio}"
        )
    if not vae.use_framewise_decoding:
        return plan_temporal_tiles(num_latent_frames, num_latent_frames, num_latent_frames, ratio)
    return plan_temporal_tiles(
        num_latent_frames, vae.tile_sample_min_num_frames // ratio, vae.tile_sample_stride_num_frames // ratio, ratio
    )


def blend_frames_of(vae) -> int:
    """Video frames cross-faded between consecutive temporal tiles (tile - stride; official 16)."""
    return vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames


# ---------------------------------------------------------------------------------------------------------------------
# Spatial tiling


@dataclass(frozen=True)
class SpatialTile:
    """One spatial decode tile: the latent rows ``[y0, y1)`` and columns ``[x0, x1)`` it reads."""

    index: int
    row: int
    col: int
    y0: int
    y1: int
    x0: int
    x1: int


@dataclass(frozen=True)
class SpatialPlan:
    """The spatial tiles of one temporal tile, as diffusers' ``tiled_decode`` makes them (row-major), and how they
    are blended. Sizes in ``blend``/``keep``/``size`` are decoded pixels ``(height, width)``."""

    tiles: tuple[SpatialTile, ...]
    tiled: bool
    """False: the whole frame is decoded at once (tiling off, or the frame fits one tile)."""
    blend: tuple[int, int]
    """Pixels cross-faded with the tile above / to the left (tile - stride; official 64)."""
    keep: tuple[int, int]
    """Pixels of each tile kept after blending (the stride; official 192)."""
    size: tuple[int, int]
    """The decoded frame."""

    @property
    def rows(self) -> int:
        return 1 + max(t.row for t in self.tiles)

    @property
    def cols(self) -> int:
        return 1 + max(t.col for t in self.tiles)


def plan_spatial_tiles(
    height: int, width: int, tile: int, stride: int, ratio: int = 8, tile_px: int | None = None, stride_px=None
) -> SpatialPlan:
    """Spatial tiles of a ``height × width`` latent frame: a ``tile``-latent tile every ``stride`` latents in both
    directions (pure). ``tile_px``/``stride_px``: the same in pixels (default ``· ratio``), for the blend widths."""
    if not 0 < stride <= tile:
        raise InputError(f"VAE tiling: spatial stride {stride} must be in 1..tile {tile} latents")
    tile_px = tile * ratio if tile_px is None else tile_px
    stride_px = stride * ratio if stride_px is None else stride_px
    tiles = []
    for row, y0 in enumerate(range(0, height, stride)):
        for col, x0 in enumerate(range(0, width, stride)):
            tiles.append(SpatialTile(len(tiles), row, col, y0, min(y0 + tile, height), x0, min(x0 + tile, width)))
    blend = (tile_px - stride_px, tile_px - stride_px)
    return SpatialPlan(tuple(tiles), True, blend, (stride_px, stride_px), (height * ratio, width * ratio))


def whole_frame_plan(height: int, width: int, ratio: int = 8) -> SpatialPlan:
    """One tile covering the frame (no spatial tiling)."""
    size = (height * ratio, width * ratio)
    return SpatialPlan((SpatialTile(0, 0, 0, 0, height, 0, width),), False, (0, 0), size, size)


def spatial_plan_for_vae(vae, height: int, width: int) -> SpatialPlan:
    """The spatial plan the VAE's settings give for ``height × width`` latents (diffusers' condition: tiling on and
    the frame larger than one tile in either direction)."""
    ratio = vae.spatial_compression_ratio
    min_h, min_w = vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio
    if not (vae.use_tiling and (width > min_w or height > min_h)):
        return whole_frame_plan(height, width, ratio)
    if (vae.tile_sample_min_height, vae.tile_sample_stride_height) != (
        vae.tile_sample_min_width,
        vae.tile_sample_stride_width,
    ):
        raise InputError("VAE tiling: square spatial tiles only (vae_tile_size / vae_tile_stride)")
    return plan_spatial_tiles(
        height,
        width,
        min_h,
        vae.tile_sample_stride_height // ratio,
        ratio,
        vae.tile_sample_min_height,
        vae.tile_sample_stride_height,
    )


@torch.no_grad()
def decode_piece(vae, latents: torch.Tensor, tile: Tile, spatial: SpatialTile) -> torch.Tensor:
    """Decode one spatial tile of one temporal tile (``post_quant_conv`` + decoder, as diffusers does per tile);
    later temporal tiles drop their first decoded frame (before or after the spatial blend is the same: the blend
    works frame by frame)."""
    param = next(vae.parameters())
    z = latents[:, :, tile.latent_start : tile.latent_stop].to(device=param.device, dtype=param.dtype)
    z = z[:, :, :, spatial.y0 : spatial.y1, spatial.x0 : spatial.x1]
    decoded = vae.decoder(vae.post_quant_conv(z))
    return decoded[:, :, 1:] if tile.latent_start > 0 else decoded


def blend_spatial(plan: SpatialPlan, pieces: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Assemble one temporal tile from its decoded spatial tiles (``{spatial index: [B, 3, n, h, w]}``) exactly as
    diffusers' ``tiled_decode`` does: each tile, in row-major order, is cross-faded in place with the (already
    blended) tile above and then the one to its left, and its first ``keep`` pixels are kept. The pieces are
    modified in place."""
    if not plan.tiled:
        return pieces[0]
    grid = {(t.row, t.col): pieces[t.index] for t in plan.tiles}
    rows = []
    for r in range(plan.rows):
        row = []
        for c in range(plan.cols):
            tile = grid[(r, c)]
            if r > 0:
                above = grid[(r - 1, c)]
                extent = min(above.shape[-2], tile.shape[-2], plan.blend[0])
                for y in range(extent):
                    tile[:, :, :, y, :] = above[:, :, :, -extent + y, :] * (1 - y / extent) + tile[:, :, :, y, :] * (
                        y / extent
                    )
            if c > 0:
                left = grid[(r, c - 1)]
                extent = min(left.shape[-1], tile.shape[-1], plan.blend[1])
                for x in range(extent):
                    tile[:, :, :, :, x] = left[:, :, :, :, -extent + x] * (1 - x / extent) + tile[:, :, :, :, x] * (
                        x / extent
                    )
            row.append(tile[:, :, :, : plan.keep[0], : plan.keep[1]])
        rows.append(torch.cat(row, dim=-1))
    return torch.cat(rows, dim=3)[:, :, :, : plan.size[0], : plan.size[1]]


@torch.no_grad()
def decode_tile(vae, latents: torch.Tensor, tile: Tile) -> torch.Tensor:
    """Decode one temporal tile (spatially tiled like diffusers) and drop the first frame of later tiles."""
    plan = spatial_plan_for_vae(vae, latents.shape[-2], latents.shape[-1])
    return blend_spatial(plan, {s.index: decode_piece(vae, latents, tile, s) for s in plan.tiles})


def decode_tiles(
    vae, latents: torch.Tensor, tiles: Sequence[Tile], indices: Sequence[int] | None = None
) -> dict[int, torch.Tensor]:
    """Decode the tiles with the given indices (default: all) → ``{index: [B, 3, n, H, W]}``."""
    wanted = range(len(tiles)) if indices is None else indices
    return {index: decode_tile(vae, latents, tiles[index]) for index in wanted}


class TileBlender:
    """Cross-fades consecutive decoded tiles as diffusers' ``blend_t`` does, keeping only the previous tile's tail."""

    def __init__(self, blend_frames: int):
        self.blend_frames = blend_frames
        self.tail: torch.Tensor | None = None

    def push(self, tile: Tile, decoded: torch.Tensor) -> torch.Tensor:
        """Blend ``decoded`` into place and return its final frames ``[frame_start, emit_stop)``."""
        if decoded.shape[2] != tile.frame_stop - tile.frame_start:
            raise ValueError(f"tile {tile.index}: {decoded.shape[2]} decoded frames, plan says {tile}")
        current = decoded.clone()
        if self.tail is not None:
            extent = min(self.tail.shape[2], current.shape[2], self.blend_frames)
            prev = self.tail
            # The same expressions as diffusers' blend_t, frame by frame, so results are bit-identical.
            for x in range(extent):
                current[:, :, x] = prev[:, :, -extent + x] * (1 - x / extent) + current[:, :, x] * (x / extent)
        self.tail = current[:, :, -self.blend_frames :].clone() if self.blend_frames > 0 else None
        return current[:, :, : tile.emit_stop - tile.frame_start]


def blend_and_emit(
    tiles: Sequence[Tile], decoded: Mapping[int, torch.Tensor], blend_frames: int
) -> Iterator[torch.Tensor]:
    """Blend decoded tiles (from any ranks) in order, yielding each tile's final frames ``[B, 3, n, H, W]``.

    ``blend_frames`` is ``blend_frames_of(vae)``.
    """
    blender = TileBlender(blend_frames)
    for tile in tiles:
        yield blender.push(tile, decoded[tile.index])


def decode_video(vae, latents: torch.Tensor, tiles: Sequence[Tile] | None = None) -> torch.Tensor:
    """Decode the whole video in one process: ``[B, C, T, h, w]`` VAE-space latents → ``[B, 3, F, H, W]``."""
    tiles = plan_for_vae(vae, latents.shape[2]) if tiles is None else tiles
    decoded = decode_tiles(vae, latents, tiles)
    return torch.cat(list(blend_and_emit(tiles, decoded, blend_frames_of(vae))), dim=2)


def iter_decoded_frames(vae, latents: torch.Tensor, tiles: Sequence[Tile] | None = None) -> Iterator[torch.Tensor]:
    """Stream the decode of one video (``B == 1``): yields float32 ``[3, n, H, W]`` chunks in order, each as soon as
    its blend is final, holding one decoded tile and one overlap in memory."""
    if latents.shape[0] != 1:
        raise ValueError(f"iter_decoded_frames decodes one video, got a batch of {latents.shape[0]}")
    tiles = plan_for_vae(vae, latents.shape[2]) if tiles is None else tiles
    blender = TileBlender(blend_frames_of(vae))
    for tile in tiles:
        yield blender.push(tile, decode_tile(vae, latents, tile))[0].float()
