"""Weight sharding of the DiT (``memory.shard=fsdp``): FSDP2 over the ranks that render one video.

Every unit of ``AvatarDiT.block_sequence()`` (the text refiner, each double block and its audio adapter, each single
block) is one ``fully_shard`` group, the rest of the model (embedders, final layer) is the root group. A rank holds
1/n of every unit; a unit's weights are all-gathered just before its forward, freed again right after it
(``reshard_after_forward=True``), and the next unit's all-gather is issued as soon as the current one starts
(explicit forward prefetch), so one to two full units are alive at a time. Gathering only copies bytes: the forward
sees the same weights as an unsharded model, and the outputs are bit-identical (tests/dist/test_fsdp.py).

Which ranks: the shard group is the ``video`` axis, cfg × ring × ulysses of the mesh (the ranks of one data group).
FSDP's all-gathers happen inside the forward, so every rank of the group must run the same forwards in the same order:

- the sequence-parallel ranks of one video already do (their attention all-to-alls require it);
- the two CFG ranks run different branches (negative/unconditioned vs. conditioned) with the same weights: one
  batch-of-one forward each per window call (``GuidedVelocity.branches``), the same windows (the data group's), the
  same cache mode (``CachePlan.mode`` depends on the step only: a full forward runs every unit in order, a cached
  one only the last single block, on both) — for ``shift``, ``blend`` and ``segments``, cache on or off;
- data groups do *not*: windows and segments are dealt round-robin (3 windows over 2 groups: 2 forwards vs 1), and
  in batch mode each group renders its own rows. So the data axis is never part of the shard group; each data
  group holds its own sharded copy.

fp8 weights shard too. FSDP2 all-gathers a group whose tensors have mixed dtypes as raw bytes (uint8); gloo cannot
all-gather float8 tensors (``Invalid scalar type``) but every fp8 unit here mixes float8 weights with bf16 biases and
norm weights, so its gather is uint8 on gloo as on NCCL. ``shard_dit`` refuses a unit that would be gathered as
float8 on a CPU mesh rather than fail inside the first forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: The flattened mesh axis of the ranks rendering one video (cfg × ring × ulysses).
VIDEO_AXIS = "video"
_INNER_AXES = ("cfg", "ring", "ulysses")
_FLOAT8 = {getattr(torch, name) for name in dir(torch) if name.startswith("float8_")}


def video_mesh(mesh):
    """The 1-D ``DeviceMesh`` of the ranks rendering one video with this one, from the run's mesh over (data, cfg,
    ring, ulysses); None without a mesh (one process). Collective on first use: call it on every rank. The same axis
    as ``avatar.plan.ParallelMesh.video_mesh`` (whichever runs first flattens it, the other finds it); ``avatar``
    does not import ``launch``, so the pipeline takes it from ``Topology.mesh`` here."""
    if mesh is None:
        return None
    try:
        return mesh[VIDEO_AXIS]
    except KeyError:
        return mesh[_INNER_AXES]._flatten(VIDEO_AXIS)


def _gather_dtype(unit: nn.Module) -> torch.dtype | None:
    """The dtype FSDP2 all-gathers ``unit``'s parameters in (uint8 when they mix dtypes)."""
    dtypes = {p.dtype for p in unit.parameters(recurse=True)}
    if not dtypes:
        return None
    return next(iter(dtypes)) if len(dtypes) == 1 else torch.uint8


def shard_dit(model: nn.Module, mesh, *, offload_to_host: bool = False) -> nn.Module:
    """Shard ``model`` (an ``AvatarDiT`` on any device) over the 1-D ``mesh`` in place; its shards end on the mesh's
    device (or in pinned host memory with ``offload_to_host``: FSDP's CPU offload, copied in per unit). Units are
    moved and sharded one at a time, so the device never holds more than the shards and one full unit."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"shard_dit needs a 1-D mesh (the video axis), got {mesh.ndim} dims")
    model.requires_grad_(False)  # inference: FSDP2 then accepts the official fp32 modules beside bf16 ones
    units = model.block_sequence()
    if mesh.device_type == "cpu":
        for unit in units:
            if _gather_dtype(unit) in _FLOAT8:
                raise ValueError(
                    f"{type(unit).__name__} has only float8 parameters, which gloo cannot all-gather; "
                    "shard it on CUDA (NCCL) or keep a bf16 tensor in it"
                )
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload_to_host else OffloadPolicy()
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, offload_policy=policy)
    for unit, following in zip(units, units[1:]):
        unit.set_modules_to_forward_prefetch([following])
    log.info(
        "memory: DiT sharded (FSDP2) over %d rank(s) of the video axis, %d units, reshard after each forward, "
        "next unit prefetched%s; %.2f GB of weights on this rank",
        mesh.size(),
        len(units),
        ", shards in host memory" if offload_to_host else "",
        local_weight_bytes(model) / 1e9,
    )
    return model


def local_weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this rank holds (its shards under FSDP)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total
