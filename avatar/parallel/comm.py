"""Every collective we issue goes through this module, which counts calls and bytes per category.

``counting()`` counts the collectives issued inside a block (the renderer's run report, tests, the bench). "Bytes" are the bytes this rank *sends* under the usual ring/pairwise algorithms:
all_to_all_single: the input minus the slice kept locally; all_gather: its tensor to each of the n−1 others (n−1
chunks around a ring); isend: the tensor; broadcast: the tensor on the source, 0 elsewhere; all_reduce: 2·(n−1)/n of
the tensor (reduce-scatter + all-gather).

Also here: the small exchanges the pipeline needs (object broadcast, named-tensor broadcast (a small pickled header,
then the bytes as tensors), CFG branch exchange, data-axis gather).
Groups: ``broadcast*``/``all_reduce`` follow torch (None = the default group); the axis helpers ``cfg_exchange`` and
``data_all_gather_windows`` take an axis group where None means the axis has size 1 (nothing to exchange).
"""

from __future__ import annotations

import io
import math
import pickle
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

CATEGORIES = ("all_to_all", "all_gather", "p2p", "broadcast", "all_reduce")


@dataclass
class CommStats:
    """Calls and bytes sent by this rank, per category (see the module docstring)."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, category: str, num_bytes: int) -> None:
        self.calls[category] += 1
        self.bytes[category] += int(num_bytes)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """``category -> (calls, bytes)`` for the categories used so far."""
        return {name: (self.calls[name], self.bytes[name]) for name in CATEGORIES if self.calls.get(name)}


_COUNTERS: list[CommStats] = []  # the counters of the active ``counting()`` blocks


@contextmanager
def counting() -> Iterator[CommStats]:
    """Count the collectives issued inside the block into a fresh ``CommStats`` (blocks may nest)."""
    fresh = CommStats()
    _COUNTERS.append(fresh)
    try:
        yield fresh
    finally:
        _COUNTERS.remove(fresh)


def _record(category: str, num_bytes: int) -> None:
    for counter in _COUNTERS:
        counter.record(category, num_bytes)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def group_size(group) -> int:
    """Size of ``group`` (1 for None or without a process group)."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in ``group`` (0 for None or without a process group)."""
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


# --- counted collectives ---------------------------------------------------------------------------------------------


def all_to_all_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """Equal splits along dim 0: slice i of ``tensor`` goes to rank i, slice j of ``output`` comes from rank j."""
    size = group_size(group)
    _record("all_to_all", _nbytes(tensor) * (size - 1) // size)
    dist.all_to_all_single(output, tensor, group=group)


def all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in group-rank order."""
    size = group_size(group)
    if size == 1:
        return [tensor]
    tensor = tensor.contiguous()
    _record("all_gather", _nbytes(tensor) * (size - 1))
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return parts


def send_recv(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> list:
    """Post one isend and one irecv (group ranks) together; returns the requests to ``wait()`` on."""
    _record("p2p", _nbytes(send))
    ops = [
        dist.P2POp(dist.isend, send, dist.get_global_rank(group, dst), group),
        dist.P2POp(dist.irecv, recv, dist.get_global_rank(group, src), group),
    ]
    return dist.batch_isend_irecv(ops)


def broadcast(tensor: torch.Tensor, src: int, group=None) -> None:
    """In-place broadcast from global rank ``src``."""
    is_source = dist.get_rank() == src
    _record("broadcast", _nbytes(tensor) if is_source else 0)
    dist.broadcast(tensor, src, group=group)


def all_reduce(tensor: torch.Tensor, group=None, op=None) -> None:
    """In-place all-reduce (sum unless ``op`` is given)."""
    size = group_size(group)
    _record("all_reduce", 2 * (size - 1) * _nbytes(tensor) // max(size, 1))
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group)


# --- pipeline exchanges ----------------------------------------------------------------------------------------------


def comm_device(group, preferred: torch.device) -> torch.device:
    """Where tensors for ``group`` must live: CPU when gloo serves it, else ``preferred`` (CUDA for NCCL)."""
    backend = str(dist.get_backend(group))
    return torch.device("cpu") if "gloo" in backend else preferred


def broadcast_object(obj, src: int = 0, group=None, device: torch.device | None = None):
    """Send a picklable object (tensors included, moved to CPU) from global rank ``src`` to the ranks of ``group``;
    returns it everywhere. Without a process group, returns ``obj``."""
    if not dist.is_initialized() or group_size(group if group is not None else dist.group.WORLD) == 1:
        return obj
    where = comm_device(group, device or torch.device("cpu"))
    is_source = dist.get_rank() == src
    if is_source:
        buffer = io.BytesIO()
        torch.save(obj, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(where)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=where)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=where)
    broadcast(size, src, group)
    if not is_source:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=where)
    broadcast(payload, src, group)
    if is_source:
        return obj
    return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), weights_only=False)


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int = 0, group=None, device=None, meta=None):
    """Send the named tensors of global rank ``src`` (and a small picklable ``meta``) to the ranks of ``group``.

    One small pickled header (names, shapes, dtypes, ``meta``), then the tensor bytes with one ``broadcast`` per
    dtype, each dtype's tensors packed into one flat buffer on the group's device (CUDA under NCCL): nothing but the
    header is pickled. Returns ``(tensors, meta)``: on ``src`` its own tensors, elsewhere copies on that device."""
    if not dist.is_initialized() or group_size(group if group is not None else dist.group.WORLD) == 1:
        return tensors, meta
    where = comm_device(group, device or torch.device("cpu"))
    is_source = dist.get_rank() == src
    header = None
    if is_source:
        header = ([(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], meta)
    specs, meta = broadcast_object(header, src=src, group=group, device=device)
    received: dict[str, torch.Tensor] = {}
    for dtype in dict.fromkeys(spec[2] for spec in specs):  # dtypes in order of first appearance
        names = [(name, shape) for name, shape, spec_dtype in specs if spec_dtype == dtype]
        wire = torch.uint8 if dtype == torch.bool else dtype  # bool travels as bytes (not every backend has it)
        if is_source:
            flat = torch.cat([tensors[name].detach().reshape(-1).to(where, wire) for name, _ in names])
        else:
            flat = torch.empty(sum(math.prod(shape) for _, shape in names), dtype=wire, device=where)
        broadcast(flat, src, group)
        if is_source:
            continue
        offset = 0
        for name, shape in names:
            size = math.prod(shape)
            received[name] = flat[offset : offset + size].view(shape).to(dtype)
            offset += size
    if is_source:
        return tensors, meta
    return {name: received[name] for name, _, _ in specs}, meta


def all_gather_object(obj, group) -> list:
    """Every rank's picklable ``obj`` in group-rank order (``[obj]`` without a group)."""
    size = group_size(group)
    if size == 1:
        return [obj]
    _record("all_gather", len(pickle.dumps(obj)) * (size - 1))
    objects: list = [None] * size
    dist.all_gather_object(objects, obj, group=group)
    return objects


def cfg_exchange(v_local: torch.Tensor, cfg_group) -> torch.Tensor:
    """CFG-parallel: cfg rank 0 holds the unconditional branch, rank 1 the conditional one (``[B, ...]`` each);
    both get ``[2B, ...]`` ordered (uncond, cond). With no CFG group, returns ``v_local``."""
    if group_size(cfg_group) == 1:
        return v_local
    return torch.cat(all_gather(v_local, cfg_group), dim=0)


def data_all_gather_windows(items: dict[int, torch.Tensor], data_group, device: torch.device | None = None):
    """Data-parallel: each data group contributes its own windows (``index -> tensor``, any shapes); every rank
    gets all of them (on ``device``, default CPU). Sent as one pickled payload per group."""
    if group_size(data_group) == 1:
        return dict(items)
    payload = pickle.dumps({index: tensor.detach().cpu() for index, tensor in items.items()})
    objects: list = [None] * group_size(data_group)
    _record("all_gather", len(payload) * (len(objects) - 1))
    dist.all_gather_object(objects, payload, group=data_group)
    merged: dict[int, torch.Tensor] = {}
    for blob in objects:
        for index, tensor in pickle.loads(blob).items():
            if index in merged:
                raise ValueError(f"window {index} was rendered by two data groups")
            merged[index] = tensor.to(device or torch.device("cpu"))
    return merged
