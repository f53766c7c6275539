"""Live tensor bytes per device, counted at the dispatcher: every storage an op creates is counted until it is freed.

``LiveBytes`` is a ``TorchDispatchMode``; under ``FakeTensorMode`` (no memory, shapes only) it measures what our real
code would hold at full size, op by op, with Python's own lifetimes deciding when a tensor dies. The same mode on
real tensors is the measurement the fake one predicts (``bench/memory_model.py`` compares them with RSS).
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Counts bytes of live storages per device (``live``), their running peak (``peak``) and, with ``mark``, the
    peak inside named stages (``stages``). Tensors that existed before the mode are counted through ``adopt``."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._stage: str | None = None
        self.stages: dict[str, int] = {}

    # --- accounting ---------------------------------------------------------------------------------------------

    def _add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        device = str(tensor.device)
        self._seen[storage] = size
        self.live[device] += size
        weakref.finalize(storage, self._free, device, size)
        if self.live[device] > self.peak[device]:
            self.peak[device] = self.live[device]
        if self._stage is not None:
            self.stages[self._stage] = max(self.stages.get(self._stage, 0), self.total)

    def _free(self, device: str, size: int) -> None:
        self.live[device] -= size

    def adopt(self, tensors) -> None:
        """Count already existing tensors (a module's parameters and buffers, inputs) as live."""
        for tensor in tensors:
            self._add(tensor)

    @property
    def total(self) -> int:
        return sum(self.live.values())

    @property
    def total_peak(self) -> int:
        return sum(self.peak.values())

    def reset_peak(self) -> None:
        self.peak = defaultdict(int, self.live)

    def mark(self, stage: str | None) -> None:
        """Record the peak of everything live while ``stage`` runs (until the next ``mark``)."""
        self._stage = stage
        if stage is not None:
            self.stages[stage] = max(self.stages.get(stage, 0), self.total)

    # --- dispatch -----------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_iter(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out
