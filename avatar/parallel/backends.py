"""The choice of sequence backend (``attention.backend``): our own ``DistributedSequence`` (``native``) or the
optional xfuser adapter. Above both modules, so neither imports the other's user."""

from __future__ import annotations

from avatar.parallel import comm
from avatar.parallel.base import LocalSequence
from avatar.parallel.sequence import DistributedSequence
from avatar.parallel.xfuser import XfuserSequence, require_xfuser

BACKENDS = ("native", "xfuser")


def build_sequence(
    backend: str = "native",
    kernel: str = "sdpa",
    ring_group=None,
    ulysses_group=None,
    data_degree: int = 1,
    cfg_degree: int = 1,
):
    """The model's sequence boundary: ``LocalSequence`` when both groups have size 1, else our
    ``DistributedSequence`` (``backend=native``) or the optional xfuser adapter (``backend=xfuser``, which checks
    its requirements even for one rank so a bad choice fails early). Call on every rank (xfuser builds groups)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend={backend!r} is not one of {BACKENDS}")
    num_sequence_ranks = comm.group_size(ring_group) * comm.group_size(ulysses_group)
    if backend == "xfuser":
        require_xfuser()
        if num_sequence_ranks > 1:
            return XfuserSequence(ring_group, ulysses_group, kernel, data_degree=data_degree, cfg_degree=cfg_degree)
    if num_sequence_ranks == 1:
        return LocalSequence(kernel=kernel)
    return DistributedSequence(ring_group=ring_group, ulysses_group=ulysses_group, kernel=kernel)
