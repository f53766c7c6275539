"""What each ``memory.mode`` means: where the DiT weights, the encoders and the deep-cache buffers live.

``auto`` tries the modes in ``AUTO_ORDER`` and takes the first whose estimate fits (``avatar/memory/plan.py``);
``memory.shard`` / ``memory.offload`` override the parts of the chosen mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from avatar.config import MemoryConfig, MemoryMode, ModelConfig, Offload, Shard

#: The cheapest first: what ``memory=auto`` tries, in order.
AUTO_ORDER = (
    MemoryMode.none,
    MemoryMode.fsdp,
    MemoryMode.fp8,
    MemoryMode.fsdp_fp8,
    MemoryMode.offload,
    MemoryMode.low,
)


@dataclass(frozen=True)
class Placement:
    """The parts of a memory mode."""

    mode: MemoryMode
    shard: Shard = Shard.none
    """``fsdp``: the DiT blocks are sharded (FSDP2) over the ranks of one video."""
    offload: Offload = Offload.none
    """``blocks``: DiT blocks stream from host memory; ``model``: whole modules move in and out."""
    fp8: bool = False
    """The fp8 checkpoint, weights kept fp8 in memory."""
    cache_on_host: bool = False
    """The deep-cache buffers live in (pinned) host memory."""
    encoders_on_cpu: bool = False
    """The text/audio/image encoders run on the CPU (otherwise on the GPU, freed before denoising)."""
    vae_tile_frames: int | None = None
    """Temporal VAE tile in video frames (stride ¾ of it) instead of ``model.vae_tile_frames``: ``low`` halves the
    official 64, which halves the decode's peak (≈9 GB → ≈4.4 GB at 256 px tiles)."""


_MODES = {
    MemoryMode.none: Placement(MemoryMode.none),
    MemoryMode.fsdp: Placement(MemoryMode.fsdp, shard=Shard.fsdp),
    MemoryMode.fp8: Placement(MemoryMode.fp8, fp8=True),
    MemoryMode.fsdp_fp8: Placement(MemoryMode.fsdp_fp8, shard=Shard.fsdp, fp8=True),
    MemoryMode.offload: Placement(MemoryMode.offload, offload=Offload.blocks, fp8=True),
    MemoryMode.low: Placement(
        MemoryMode.low,
        offload=Offload.blocks,
        fp8=True,
        cache_on_host=True,
        encoders_on_cpu=True,
        vae_tile_frames=32,
    ),
}


def placement(memory: MemoryConfig, mode: MemoryMode | None = None) -> Placement:
    """The placement of ``mode`` (default: ``memory.mode``, which must not be ``auto`` here) with the explicit
    ``memory.shard`` / ``memory.offload`` applied."""
    mode = MemoryMode(mode if mode is not None else memory.mode)
    if mode == MemoryMode.auto:
        raise ValueError("memory.mode=auto must be resolved (avatar/memory/plan.py) before it has a placement")
    chosen = _MODES[mode]
    if memory.shard is not None:
        chosen = replace(chosen, shard=Shard(memory.shard))
    if memory.offload is not None:
        chosen = replace(chosen, offload=Offload(memory.offload))
    return chosen


def tiled_model(model: ModelConfig, chosen: Placement) -> ModelConfig:
    """``model`` with the VAE tiles of ``chosen`` (itself when the placement keeps the model's tiles)."""
    frames = chosen.vae_tile_frames
    if frames is None or frames >= model.vae_tile_frames:
        return model
    return replace(model, vae_tile_frames=frames, vae_tile_stride_frames=frames * 3 // 4)
