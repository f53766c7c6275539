"""Who does what: the pipeline's view of the parallel plan.

``Topology`` is built once from the ``ParallelPlan``'s device mesh (``ParallelMesh.topologies`` in
``avatar/plan.py``) and handed to every stage. It holds the process groups of the data and CFG axes and of the
ranks rendering together, all taken from that one mesh, the mesh itself, the sequence-parallel boundary object for
the model, and the few exchanges the pipeline needs. With one process every group is None and every exchange is the
identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from avatar.parallel import comm
from avatar.parallel.base import LocalSequence


@dataclass
class Topology:
    rank: int = 0
    world: int = 1
    data_rank: int = 0
    data_size: int = 1
    data_group: object = None
    cfg_rank: int = 0
    cfg_size: int = 1
    cfg_group: object = None
    seq: object = field(default_factory=LocalSequence)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: object = None
    """Process group of the ranks rendering together (None: the whole world). In batch mode every data-parallel
    group renders its own rows, and ``rank``/``world`` are this process's place in its group."""
    leader: int = 0
    """Global rank of the group's rank 0 (the one that encodes, writes files and saves checkpoints)."""
    window_group: object = None
    """Process group of the ranks that compute one window together (the CFG and sequence ranks of one data group);
    None: ``group`` (one data group). The adaptive step cache agrees its per-window decisions over it."""
    mesh: object = None
    """The run's ``DeviceMesh`` over ("data", "cfg", "ring", "ulysses") the groups above come from (None with one
    process); after a batch's row topology is built it also has the flattened axis "video" (cfg × ring × ulysses,
    the ranks of one data group)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # --- exchanges -------------------------------------------------------------------------------------------------

    def broadcast_object(self, obj, src: int = 0):
        """Send a picklable object (tensors included) from rank ``src`` of the group to every rank of it."""
        if not self.distributed:
            return obj
        return comm.broadcast_object(obj, src=self.leader + src, group=self.group, device=self.device)

    def broadcast_fields(self, obj, src: int = 0):
        """Send a dataclass instance from rank ``src`` of the group to every rank of it: its tensor fields as tensors
        (``comm.broadcast_tensors``, one collective per dtype), only the class and the other fields pickled.
        Elsewhere the tensors arrive on the group's device (CPU under gloo); on ``src`` ``obj`` itself is returned."""
        if not self.distributed:
            return obj
        tensors = meta = None
        if self.rank == src:
            values = {f.name: getattr(obj, f.name) for f in fields(obj)}
            tensors = {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}
            meta = (type(obj), {name: v for name, v in values.items() if name not in tensors})
        tensors, (cls, rest) = comm.broadcast_tensors(
            tensors, src=self.leader + src, group=self.group, device=self.device, meta=meta
        )
        return obj if self.rank == src else cls(**tensors, **rest)

    def all_gather_cfg(self, branch: torch.Tensor) -> torch.Tensor:
        """CFG-parallel: each half holds one branch ``[1, ...]``; return ``[2, ...]`` ordered (uncond, cond)."""
        return comm.cfg_exchange(branch, self.cfg_group if self.cfg_size > 1 else None)

    def all_gather_data(self, items: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Data-parallel: every group contributes the results of its own windows (``index -> tensor``); every rank
        gets all of them."""
        if self.data_size == 1:
            return dict(items)
        return comm.data_all_gather_windows(items, self.data_group, device=self.device)

    def gather_to_main(self, obj):
        """Every rank of the group sends ``obj``; its rank 0 gets the list in rank order, the others None."""
        if not self.distributed:
            return [obj]
        objects: list = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, objects, dst=self.leader, group=self.group)
        return objects

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=comm.comm_device(self.group, self.device))
        comm.all_reduce(tensor, group=self.group, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def all_reduce_window(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (a small float64 vector) over the ranks computing one window together (``window_group``):
        one tiny all-reduce; returns the sums (on this tensor's device)."""
        group = self.window_group if self.data_size > 1 else self.group
        if not self.distributed or (self.data_size > 1 and group is None and self.world == self.data_size):
            return values
        if self.data_size > 1 and group is None:
            raise ValueError("Topology.window_group is needed with data-parallel groups of several ranks")
        wire = values.to(comm.comm_device(group, self.device))
        comm.all_reduce(wire, group=group)
        return wire.to(values.device)

    def owns(self, index: int) -> bool:
        """Data-parallel ownership of window/segment/row ``index`` (round-robin over the data groups)."""
        return index % self.data_size == self.data_rank
