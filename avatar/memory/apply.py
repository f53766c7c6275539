"""Carrying out a memory placement: which mode runs, where the DiT is loaded, how it is sharded or offloaded.

The renderer asks ``run_placement(cfg)`` once, loads the DiT on ``dit_load_device(...)`` and hands it to
``place_dit``, which applies the placement (``avatar/memory/modes.py``): FSDP2 sharding over the ranks of one video
(``avatar/parallel/fsdp.py``), block streaming or whole-module offload (``avatar/memory/offload.py``), or plain
residence on the device. Every choice is logged in one ``memory:`` line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from avatar.config import MemoryMode, Offload, RunConfig, Shard
from avatar.io.errors import InputError
from avatar.memory.modes import Placement, placement

log = logging.getLogger(__name__)


def resolved_mode(cfg: RunConfig) -> MemoryMode:
    """The memory mode this run uses. ``auto`` is ``none`` here until the memory plan (``avatar/memory/plan.py``)
    resolves it to the cheapest mode that fits; this is the one place that decides it."""
    mode = MemoryMode(cfg.memory.mode)
    return MemoryMode.none if mode == MemoryMode.auto else mode


def run_placement(cfg: RunConfig) -> Placement:
    """The placement in effect: the resolved mode's, with ``memory.shard``/``memory.offload`` applied and ``fp8=true``
    adding fp8 weights to any mode."""
    chosen = placement(cfg.memory, resolved_mode(cfg))
    return replace(chosen, fp8=True) if cfg.fp8 and not chosen.fp8 else chosen


def check_placement(cfg: RunConfig) -> None:
    """Combinations that cannot run (InputError, exit 2, before anything is built)."""
    chosen = run_placement(cfg)
    if chosen.shard == Shard.fsdp and chosen.offload == Offload.model:
        raise InputError(
            f"memory.shard=fsdp with memory.offload=model (memory={cfg.memory.mode}) is not supported: sharded "
            "weights stay where FSDP put them; use memory.offload=blocks (shards in host memory) or memory.offload=none"
        )


def describe(chosen: Placement, asked: MemoryMode | str | None = None) -> str:
    """One line: the mode (and the one asked for, when that was another, e.g. ``auto``) and where everything lives."""
    asked = None if asked is None or MemoryMode(asked) == chosen.mode else MemoryMode(asked)
    parts = [
        f"memory={chosen.mode}" + ("" if asked is None else f" (asked: {asked})"),
        "DiT fp8" if chosen.fp8 else "DiT in the run dtype",
        "sharded (FSDP2)" if chosen.shard == Shard.fsdp else "replicated",
        _offload_words(chosen),
        "deep cache in host memory" if chosen.cache_on_host else "deep cache on the device",
        "encoders on the CPU" if chosen.encoders_on_cpu else "encoders on the device",
    ]
    return ", ".join(parts)


def _offload_words(chosen: Placement) -> str:
    if chosen.offload == Offload.blocks:
        return "shards in host memory" if chosen.shard == Shard.fsdp else "blocks streamed from host"
    return "DiT and VAE offloaded whole" if chosen.offload == Offload.model else "resident"


def dit_load_device(chosen: Placement, device: torch.device) -> torch.device:
    """Where ``load_dit`` puts the weights: the device for a resident DiT, else host memory (file-backed until
    sharded or streamed), so the device never holds the full model."""
    if chosen.shard == Shard.none and chosen.offload == Offload.none:
        return device
    return torch.device("cpu")


def encoder_device(chosen: Placement, device: torch.device) -> torch.device:
    return torch.device("cpu") if chosen.encoders_on_cpu else device


@dataclass
class PlacedDiT:
    """The DiT with its placement applied. ``offload.onload(module)`` is the context a stage runs a whole module in
    (``offload=model``: moved to the device and back; otherwise a no-op); ``streamer`` streams blocks (``blocks``)."""

    model: nn.Module
    placement: Placement
    offload: object
    streamer: object = None


def place_dit(model: nn.Module, chosen: Placement, topo, token_chunk: int | None = None) -> PlacedDiT:
    """Apply ``chosen`` to ``model`` (loaded on ``dit_load_device``) for a rank of ``topo``; sets the token chunk
    (``memory.token_chunk``; 0 or None: off; exact either way)."""
    from avatar.memory.offload import ModuleOffload, stream_blocks

    device = topo.device
    model.set_token_chunk(token_chunk or None)
    placed = PlacedDiT(model, chosen, ModuleOffload(device, enabled=chosen.offload == Offload.model))
    if chosen.shard == Shard.fsdp:
        from avatar.parallel.fsdp import shard_dit, video_mesh

        mesh = video_mesh(topo.mesh)
        if mesh is None or mesh.size() == 1:
            log.info("memory: shard=fsdp with one rank per video: nothing to shard, the DiT stays whole")
            if chosen.offload == Offload.blocks:
                placed.streamer = stream_blocks(model, device)
            else:
                model.to(device)
        else:
            shard_dit(model, mesh, offload_to_host=chosen.offload == Offload.blocks)
    elif chosen.offload == Offload.blocks:
        placed.streamer = stream_blocks(model, device)
    elif chosen.offload == Offload.model:
        placed.offload.park(model)
        log.info("memory: DiT offloaded whole: in host memory, on %s only while denoising", device)
    else:
        model.to(device)
    return placed
