"""How the work of a launch is split over the data-parallel groups: segments in rounds (one segment per group per
round), windows and batch rows round-robin (``Topology.owns``). Pure functions of the counts and the topology, so every
rank computes the same split without communication."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def segment_rounds(num_segments: int, data_size: int) -> list[range]:
    """The rounds of a ``segments`` render: consecutive runs of ``data_size`` segment indices (the last may be
    shorter); each data group renders one segment of a round."""
    if num_segments < 0 or data_size < 1:
        raise ValueError(
            f"segment_rounds needs num_segments >= 0 and data_size >= 1 (got {num_segments}, {data_size})"
        )
    return [range(start, min(start + data_size, num_segments)) for start in range(0, num_segments, data_size)]


def owned(indices: Iterable[int], topo) -> list[int]:
    """The ``indices`` (windows, segments) this rank's data group renders."""
    return [i for i in indices if topo.owns(i)]


def group_rows(rows: Sequence, topo) -> list:
    """This data group's batch rows: row ``i`` goes to group ``i % data_size``."""
    return list(rows[topo.data_rank :: topo.data_size])
