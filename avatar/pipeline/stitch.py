"""Stitching window results into a whole latent video (pure torch, no I/O): the one accumulator every lockstep loop
and every segment step of the sampler uses.

Order independence: data-parallel groups finish windows in different orders, so :class:`WindowAccumulator` sums
contributions in ascending window index whatever order they are added in. The result is therefore bitwise the same
for any add order and any number of groups. Windows added in index order are summed at once (memory: one video);
windows that arrive early wait until the ones before them are in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from avatar.pipeline.schedule import official_round

FIDELITIES = ("fp32", "official")


class WindowAccumulator:
    """Weighted average of window results over a latent video ``shape`` (time on ``time_dim``).

    - ``add(index, positions, latents, weights=None)``: window ``index`` covers the frames ``positions`` (any order,
      circular windows allowed, no repeats); ``latents`` has ``len(positions)`` frames on ``time_dim``; ``weights``
      ``[len(positions)]`` per frame, or ``None`` for counter semantics (weight 1, the ``shift`` strategy).
    - ``result()``: ``sum(w·x) / sum(w)`` per frame, in fp32. Every frame must be covered.

    ``fidelity="official"`` reproduces the official storage: each window rounded fp32 → bf16, summed into an fp16
    buffer, divided by an fp16 counter (counter semantics only).
    """

    def __init__(
        self, shape: Sequence[int], time_dim: int = 2, fidelity: str = "fp32", device: Optional[torch.device] = None
    ) -> None:
        if fidelity not in FIDELITIES:
            raise ValueError(f"sampling.fidelity={fidelity!r}: valid are {', '.join(FIDELITIES)}")
        self.shape = tuple(shape)
        self.time_dim = time_dim % len(self.shape)
        self.num_latents = self.shape[self.time_dim]
        self.fidelity = fidelity
        dtype = torch.float16 if fidelity == "official" else torch.float32
        self.total = torch.zeros(self.shape, dtype=dtype, device=device)
        self.weight = torch.zeros(self.num_latents, dtype=dtype, device=device)
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = {}
        self.seen: set[int] = set()
        self.next_index = 0

    def add(
        self,
        index: int,
        positions: Sequence[int] | torch.Tensor,
        latents: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
    ) -> None:
        """Record window ``index``'s result (summed once every window before it is in)."""
        if index < 0 or index in self.seen:
            raise ValueError(f"window index {index} is negative or was added twice")
        pos = torch.as_tensor(positions, dtype=torch.long).flatten()
        if pos.numel() == 0 or int(pos.min()) < 0 or int(pos.max()) >= self.num_latents:
            raise ValueError(f"window {index}: positions must lie in 0..{self.num_latents - 1}")
        if pos.unique().numel() != pos.numel():
            raise ValueError(f"window {index}: repeated positions")
        expected = list(self.shape)
        expected[self.time_dim] = pos.numel()
        if list(latents.shape) != expected:
            raise ValueError(f"window {index}: latents of shape {list(latents.shape)}, expected {expected}")
        if weights is not None:
            if self.fidelity == "official":
                raise ValueError("fidelity='official' averages with a counter; weights are not supported")
            weights = weights.to(torch.float32).flatten()
            if weights.numel() != pos.numel():
                raise ValueError(f"window {index}: {weights.numel()} weights for {pos.numel()} positions")
        self.seen.add(index)
        self.pending[index] = (pos, latents, weights)
        while self.next_index in self.pending:
            self._sum(*self.pending.pop(self.next_index))
            self.next_index += 1

    def _sum(self, pos: torch.Tensor, latents: torch.Tensor, weights: Optional[torch.Tensor]) -> None:
        pos = pos.to(self.total.device)
        latents = latents.to(self.total.device)
        view = [1] * len(self.shape)
        view[self.time_dim] = -1
        if self.fidelity == "official":
            # fp16 += bf16: the sum is formed in fp32 and rounded to fp16 once, as the official in-place add does.
            current = self.total.index_select(self.time_dim, pos).float()
            updated = (current + official_round(latents)).to(torch.float16)
            self.total.index_copy_(self.time_dim, pos, updated)
            self.weight[pos] = (self.weight[pos].float() + 1).to(torch.float16)
            return
        contribution = latents.to(torch.float32)
        w = torch.ones(pos.numel(), dtype=torch.float32) if weights is None else weights
        w = w.to(self.total.device)
        contribution = contribution * w.view(view)
        self.total.index_add_(self.time_dim, pos, contribution)
        self.weight.index_add_(0, pos, w)

    def result(self) -> torch.Tensor:
        """The weighted average (fp32). Raises if a frame got no weight."""
        for index in sorted(self.pending):
            self._sum(*self.pending.pop(index))
        if bool((self.weight <= 0).any()):
            missing = torch.nonzero(self.weight <= 0).flatten().tolist()
            raise ValueError(f"latent frames {missing[:8]} were covered by no window")
        view = [1] * len(self.shape)
        view[self.time_dim] = -1
        if self.fidelity == "official":
            return (self.total.float() / self.weight.float().view(view)).to(torch.float16).float()
        return self.total / self.weight.view(view)
