"""The adaptive step cache (``sampling.cache=adaptive``): runtime-adaptive step skipping in the style of EasyCache,
*instead of* the official deep cache (``avatar/pipeline/cache.py``; the two are never stacked).

No calibration table: every window call decides at run time whether to run the DiT or to reuse the transformation of
the last full step, ``Δ = v − x`` (the DiT's output minus its input latents, per CFG branch), as ``v ≈ x_t + Δ``.

- After two full steps of a window its *transformation rate* is known, per branch:
  ``k = mean|v_j − v_i| / mean|x_j − x_i|`` over its two latest full steps ``i < j`` (how strongly the output moves
  with the input).
- At a later step ``t`` the relative change of the output is estimated from the input alone:
  ``e = k · mean|x_t − x_j| / mean|v_j|`` (the input's change accumulated since the last full step ``j``, scaled
  by ``k`` and relative to the output). The step reuses while ``e < sampling.cache_threshold`` for both branches, at
  most ``sampling.cache_max_skip`` steps in a row; otherwise it runs full and the estimate starts again from 0.
- The first ``warmup_steps`` (10 % of the steps, at least 2: ``k`` needs two full steps) and the last step are always
  full. Threshold 0 never reuses: every step is the same full forward as ``cache=off``, bit for bit.

State, bounded like the deep cache: per absolute latent frame of the denoised domain, the input and each of this
rank's branches' outputs at the frame's last full step, in the frame-sliced layout of the sequence shard (every
sequence rank an equal slice ``ceil(C·h·w / W)`` of every latent frame, ``avatar/parallel/base.py``): per rank
``(1 + branches) × frames × ceil(C·h·w / W)`` fp32 values (a CFG-parallel rank holds only its branch), plus a few
numbers per window. Rows are kept per absolute frame because ``shift`` windows move every step; windows of one step
write in window order (the later window keeps an overlap), and data-parallel groups exchange their windows' rows
once per step, so every group holds the rows of all frames.

The decision is the same on every rank: every rank's partial sums over its slice and its branches go into one tiny
all-reduce per window call (``Topology.all_reduce_window``, six float64 numbers), and every rank decides from the
sums. The reused output is elementwise ``x_t + (v_j − x_j)`` on each slice, gathered over the sequence ranks, so it
does not depend on the plan; the sums are float64 and a plan could change a decision only where an estimate lies
within float64 rounding of the threshold.

Resume is exact: ``snapshot`` gathers the whole state (full frames, plan-independent) into the step checkpoint and
``restore`` gives every rank its slices back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from avatar.io.errors import InputError
from avatar.parallel import comm
from avatar.parallel.base import shard_frames, unshard_frames
from avatar.pipeline.cache import CacheStats

#: The warm-up of full steps, in tenths of the step count (EasyCache: 5 of 50), at least ``MIN_WARMUP`` steps.
WARMUP_TENTHS = 1
MIN_WARMUP = 2
#: Entries of the per-window all-reduce: input change, |v_j| per branch, pending k numerator per branch, denominator.
_DX, _NORM, _NUM, _DEN, _SIZE = 0, 1, 3, 5, 6


def check_cache_settings(sampling) -> None:
    """One-line ``InputError`` (exit 2) for ``sampling.cache_threshold``/``cache_max_skip`` values that cannot work."""
    threshold, max_skip = sampling.cache_threshold, sampling.cache_max_skip
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if not number or not math.isfinite(threshold) or threshold < 0:
        raise InputError(
            f"sampling.cache_threshold={threshold!r} is invalid; give a number ≥ 0 (0: never reuse; sampling=fast "
            "uses 0.1)"
        )
    if isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 1:
        raise InputError(
            f"sampling.cache_max_skip={max_skip!r} is invalid; give an integer ≥ 1 (reused steps in a row at most)"
        )


def warmup_steps(steps: int) -> int:
    """Full steps at the start: 10 % of ``steps`` rounded up, at least 2."""
    return max(MIN_WARMUP, -(-steps * WARMUP_TENTHS // 10))


@dataclass
class WindowState:
    """What one window (index in the step's window order) carries between steps."""

    rate: list = field(default_factory=lambda: [None, None])
    """Transformation rate ``k`` per branch (None until two full steps)."""
    skips: int = 0
    """Reused steps in a row so far."""
    full: int = 0
    reused: int = 0
    pattern: str = ""
    """One letter per step this process decided: ``F`` full, ``R`` reused (the report's per-window schedule)."""
    pending: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """This rank's part of ``k``'s numerator per branch and of its denominator, from the last full step; summed by
    the next decision's all-reduce."""
    has_pending: bool = False
    whole: bool = False
    """``pending`` holds the group's sums (after a ``snapshot``), not this rank's part."""

    def as_dict(self) -> dict:
        return {
            "rate": list(self.rate),
            "skips": self.skips,
            "full": self.full,
            "reused": self.reused,
            "pending": [float(p) for p in self.pending],
            "has_pending": self.has_pending,
        }


class AdaptiveCache:
    """The adaptive step cache of one denoised domain (``num_frames`` latent frames) on this rank."""

    def __init__(self, sampling, num_frames: int) -> None:
        self.threshold = float(sampling.cache_threshold)
        self.max_skip = int(sampling.cache_max_skip)
        self.steps = int(sampling.steps)
        self.warmup = warmup_steps(self.steps)
        self.num_frames = num_frames
        self.topo = None
        self.seq = None
        self.branches: list[int] = []
        self.stats = CacheStats()
        self.frame_shape: tuple[int, int, int] | None = None  # (C, h, w) of one latent frame
        self.x_rows: torch.Tensor | None = None  # [num_frames, slice] inputs at each frame's last full step
        self.out_rows: dict[int, torch.Tensor] = {}  # branch -> [num_frames, slice] outputs at that step
        self.valid = [False] * num_frames
        self.windows: dict[int, WindowState] = {}
        self._current: dict[int, tuple[list[int], torch.Tensor, bool]] = {}  # window -> (frames, x rows, have)
        self.staged: dict[int, tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]] = {}

    def bind(self, topo) -> None:
        """Use ``topo`` (its sequence shard, CFG branches and groups); the guided velocity and the resume call it."""
        if self.topo is None:
            self.topo, self.seq = topo, topo.seq
            self.branches = [topo.cfg_rank] if topo.cfg_size == 2 else [0, 1]

    # --- layout -----------------------------------------------------------------------------------------------------

    @property
    def _lead(self) -> bool:
        """Whether this rank adds the branch-independent sums (one CFG rank of each sequence slice)."""
        return self.topo.cfg_size == 1 or self.topo.cfg_rank == 0

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """``[1, C, T, h, w]`` → this rank's slice of every frame ``[T, ceil(C·h·w / W)]`` (fp32)."""
        _, channels, frames, height, width = t.shape
        self.frame_shape = (channels, height, width)
        flat = t[0].float().transpose(0, 1).reshape(1, frames * channels * height * width)
        return shard_frames(flat, frames, self.seq.rank, self.seq.world)[0]

    def _frames_of(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of ``_rows`` over the sequence ranks: ``[T, slice]`` → ``[1, C, T, h, w]`` on every rank."""
        channels, height, width = self.frame_shape
        frames = rows.shape[0]
        flat = self.seq.gather_frame_slices(rows[None], channels * height * width)
        return flat.reshape(frames, channels, height, width).transpose(0, 1)[None]

    def _index(self, frames: list[int], device) -> torch.Tensor:
        return torch.as_tensor(frames, dtype=torch.long, device=device)

    # --- one window call --------------------------------------------------------------------------------------------

    def decide(self, step: int, window: int, frames: list[int], x: torch.Tensor) -> bool:
        """Whether window ``window`` over absolute ``frames`` reuses at ``step`` (True) or runs full; the same on
        every rank of the window's group (one all-reduce). ``x``: the window's latents ``[1, C, T, h, w]``."""
        state = self.windows.setdefault(window, WindowState())
        rows = self._rows(x)
        have = self.x_rows is not None and all(self.valid[k] for k in frames)
        sums = torch.zeros(_SIZE, dtype=torch.float64, device=rows.device)
        local_dx = 0.0  # this rank's part of sum|x_t - x_j| (also k's denominator if this step runs full)
        if have:
            index = self._index(frames, rows.device)
            if self._lead:
                local_dx = float((rows - self.x_rows.index_select(0, index)).abs().sum(dtype=torch.float64))
                sums[_DX] = local_dx
            for b in self.branches:
                sums[_NORM + b] = self.out_rows[b].index_select(0, index).abs().sum(dtype=torch.float64)
        if state.has_pending:
            contribute = not state.whole or self.seq.rank == 0
            for b in self.branches:
                sums[_NUM + b] = state.pending[b] if contribute else 0.0
            sums[_DEN] = state.pending[2] if contribute and self._lead else 0.0
        sums = self.topo.all_reduce_window(sums).tolist()
        if state.has_pending:
            if sums[_DEN] > 0:
                state.rate = [sums[_NUM] / sums[_DEN], sums[_NUM + 1] / sums[_DEN]]
            state.has_pending, state.whole, state.pending = False, False, [0.0, 0.0, 0.0]
        reuse = False
        if (
            self.threshold > 0
            and self.warmup <= step < self.steps - 1
            and have
            and state.skips < self.max_skip
            and None not in state.rate
        ):
            estimate = max(
                state.rate[b] * sums[_DX] / sums[_NORM + b] if sums[_NORM + b] > 0 else math.inf for b in (0, 1)
            )
            reuse = estimate < self.threshold
        state.pattern += "R" if reuse else "F"
        if reuse:
            state.skips += 1
            state.reused += 1
        else:
            state.skips = 0
            state.full += 1
            state.pending[2] = local_dx
        self._current[window] = (list(frames), rows, have)
        return reuse

    def reuse(self, branch: int, window: int) -> torch.Tensor:
        """The reused output of ``branch`` for the window just decided: ``x_t + (v_j − x_j)`` ``[1, C, T, h, w]``."""
        frames, rows, _ = self._current[window]
        index = self._index(frames, rows.device)
        delta = self.out_rows[branch].index_select(0, index) - self.x_rows.index_select(0, index)
        return self._frames_of(rows + delta)

    def record(self, branch: int, window: int, out: torch.Tensor) -> None:
        """A full forward's output of ``branch`` for the window just decided: stage its rows for ``commit`` and
        this rank's part of the transformation rate's numerator."""
        frames, rows, have = self._current[window]
        out_rows = self._rows(out)
        state = self.windows[window]
        if have:
            index = self._index(frames, rows.device)
            stored = self.out_rows[branch].index_select(0, index)
            state.pending[branch] = float((out_rows - stored).abs().sum(dtype=torch.float64))
            state.has_pending = True
        _, _, outs = self.staged.setdefault(window, (frames, rows, {}))
        outs[branch] = out_rows

    def commit(self, data_group=None) -> None:
        """Apply this step's staged rows in window order (after exchanging them over ``data_group``)."""
        self._current = {}
        staged, self.staged = self.staged, {}
        if comm.group_size(data_group) > 1:
            staged = _exchange(staged, data_group, self.topo.device)
        if not staged:
            return
        for window in sorted(staged):
            frames, rows, outs = staged[window]
            if self.x_rows is None:
                self.x_rows = rows.new_zeros((self.num_frames, rows.shape[1]))
            index = self._index(frames, rows.device)
            self.x_rows.index_copy_(0, index, rows)
            for b, out_rows in outs.items():
                buffer = self.out_rows.setdefault(b, rows.new_zeros((self.num_frames, rows.shape[1])))
                buffer.index_copy_(0, index, out_rows)
            for k in frames:
                self.valid[k] = True
        self.stats.writes += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.nbytes)
        self.stats.peak_image_bytes = self.stats.peak_bytes

    # --- report -------------------------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        rows = ([self.x_rows] if self.x_rows is not None else []) + list(self.out_rows.values())
        return sum(t.numel() * t.element_size() for t in rows)

    def window_counts(self, data_group=None) -> list[dict]:
        """Full and reused window calls per window (every data group's windows; a collective over ``data_group``)."""
        mine = {w: (s.full, s.reused, s.pattern) for w, s in self.windows.items()}
        merged: dict[int, tuple[int, int, str]] = {}
        for part in comm.all_gather_object(mine, data_group):
            merged.update(part)
        return [
            {"window": w, "full": merged[w][0], "reused": merged[w][1], "steps": merged[w][2]} for w in sorted(merged)
        ]

    def free(self) -> None:
        self.x_rows, self.out_rows, self.staged, self._current = None, {}, {}, {}

    # --- resume -------------------------------------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The whole state as plain full-frame tensors and numbers (a collective over the render's ranks; the
        group's rank 0 gets it, the others ``({}, {})``). Pending sums are reduced first (and kept reduced, so a
        run that goes on and one resumed from here add the same numbers)."""
        topo = self.topo
        # Every window group reduces its own windows' pending parts: its ranks own the same windows, and the groups
        # are disjoint, so each all-reduce matches within its group.
        owned = sorted(w for w, s in self.windows.items() if s.has_pending and not s.whole)
        parts = torch.zeros((max(len(owned), 1), 3), dtype=torch.float64)
        for row, w in enumerate(owned):
            parts[row] = torch.tensor(self.windows[w].pending, dtype=torch.float64)
        reduced = topo.all_reduce_window(parts.flatten()).view(-1, 3)
        for row, w in enumerate(owned):
            state = self.windows[w]
            state.pending, state.whole = reduced[row].tolist(), True
        piece = {
            "data": topo.data_rank,
            "cfg": topo.cfg_rank,
            "seq": self.seq.rank,
            "x": None if self.x_rows is None else self.x_rows.cpu().clone(),  # copies: the live rows change on
            "out": {b: t.cpu().clone() for b, t in self.out_rows.items()},
            "windows": {w: s.as_dict() for w, s in self.windows.items()} if self.seq.rank == 0 and self._lead else {},
        }
        pieces = topo.gather_to_main(piece)
        if not topo.is_main:
            return {}, {}
        n = None if self.frame_shape is None else math.prod(self.frame_shape)
        tensors: dict[str, torch.Tensor] = {"adaptive.valid": torch.tensor(self.valid, dtype=torch.bool)}
        first = [p for p in pieces if p["data"] == 0]
        xs = sorted((p for p in first if p["cfg"] == 0 and p["x"] is not None), key=lambda p: p["seq"])
        if xs:
            tensors["adaptive.x"] = unshard_frames([p["x"][None] for p in xs], n)[0].view(self.num_frames, n)
            for b in (0, 1):
                holders = sorted((p for p in first if b in p["out"]), key=lambda p: p["seq"])
                tensors[f"adaptive.out{b}"] = unshard_frames([p["out"][b][None] for p in holders], n)[0].view(
                    self.num_frames, n
                )
        windows: dict[str, dict] = {}
        for p in pieces:
            for w, s in p["windows"].items():
                windows.setdefault(str(w), s)
        meta = {"windows": windows, "frame_shape": list(self.frame_shape) if self.frame_shape else None}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Load a ``snapshot`` (every rank gets the whole of it and keeps its slices and branches). The counts start
        again from 0, as the report's window calls of a resumed run do."""
        device = self.topo.device
        self.valid = [bool(v) for v in tensors["adaptive.valid"].tolist()]
        if len(self.valid) != self.num_frames:
            raise ValueError(f"adaptive cache state of {len(self.valid)} frames for a domain of {self.num_frames}")
        if meta.get("frame_shape"):
            self.frame_shape = tuple(meta["frame_shape"])
        if "adaptive.x" in tensors:

            def mine(full: torch.Tensor) -> torch.Tensor:
                flat = full.reshape(1, -1).to(device, torch.float32)
                return shard_frames(flat, self.num_frames, self.seq.rank, self.seq.world)[0].contiguous()

            self.x_rows = mine(tensors["adaptive.x"])
            self.out_rows = {b: mine(tensors[f"adaptive.out{b}"]) for b in self.branches}
        self.windows = {}
        for w, s in meta.get("windows", {}).items():
            self.windows[int(w)] = WindowState(
                rate=list(s["rate"]),
                skips=int(s["skips"]),
                pending=[float(p) for p in s["pending"]],
                has_pending=bool(s["has_pending"]),
                whole=bool(s["has_pending"]),
            )


def _exchange(staged: dict, data_group, device) -> dict:
    """Every data group's staged windows on every rank (one pickled payload per group)."""
    mine = {
        w: (frames, torch.stack([rows, *[outs[b] for b in sorted(outs)]]).cpu(), sorted(outs))
        for w, (frames, rows, outs) in staged.items()
    }
    merged: dict = {}
    for part in comm.all_gather_object(mine, data_group):
        for w, (frames, packed, branches) in part.items():
            packed = packed.to(device)
            merged[w] = (frames, packed[0], {b: packed[1 + i] for i, b in enumerate(branches)})
    return merged
