"""The sampler's deep cache (the official "DeepCache", dossier §4.4): per absolute latent frame, per CFG branch.

On the official cached steps the DiT runs only its last single block and the final layer, on an input rebuilt from
buffers that the last full step filled:

- on a full step every window writes the input of the last single block: the image rows of its latent frame ``k``
  into slot ``frames[k]``, and its reference-frame and text rows into every slot of the window. Windows of one step
  write in window order, so where a circular window wraps onto frames another window also covers, the later window
  stays;
- on a cached step every window reads its image rows from the slots of its own frames and the reference and text rows
  from the slot of its first frame.

Every full step covers every latent frame, so what a cached step reads depends only on the *last* full step before
it: the cache is written only on the full steps that a cached step follows (at 50 steps: 15, 20, 25, 30, 35), which
is the official result with fewer writes, and a run resumed at any full step is exact.

Memory, per rank and branch: the image rows of every frame of the denoised domain in this rank's sequence shard
(``frames × ceil(F / sp) × D`` elements; ``F`` image tokens per latent frame, ``sp`` the sequence-parallel degree),
plus one reference + text block (``(ceil(F / sp) + L) × D``) per window whose rows are still referenced. A CFG-parallel
rank holds only its branch. The rows are in the frame-sliced layout (every rank an equal slice of every frame,
``avatar/parallel/base.py``), which does not depend on where a frame sits in a window; the model shards by tokens and
converts at the cache boundary (``CachedInput``), so nothing here moves between sequence ranks. Data-parallel groups
exchange their windows' rows once per write step, so every group holds the rows of all windows.

``host=True`` (``memory=low``, ``Placement.cache_on_host``) keeps the buffers in host memory (pinned when CUDA is
there): a write copies the rows out of the GPU, a read copies a window's rows back in. The bytes are the same, so the
output is too; the GPU then holds no cache at all between steps.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from avatar.models.transformer import CachedInput
from avatar.parallel import comm
from avatar.pipeline import schedule as sched


def cache_mode(value) -> str:
    """``sampling.cache`` as ``"official"``, ``"adaptive"`` or ``"off"`` (``True``/``False``: the former boolean)."""
    if isinstance(value, bool):
        return "official" if value else "off"
    return str(value)


def uses_deep_cache(value) -> bool:
    """Whether ``sampling.cache`` is the official deep cache."""
    return cache_mode(value) == "official"


@dataclass(frozen=True)
class CachePlan:
    """Which steps write the cache and which reuse it (``sampling.cache`` off: none)."""

    reuse_steps: frozenset[int] = frozenset()

    @classmethod
    def for_steps(cls, steps: int, enabled) -> CachePlan:
        """``enabled``: ``sampling.cache`` (only ``official``/True reuses on the official steps)."""
        return cls(sched.cached_steps(steps) if uses_deep_cache(enabled) else frozenset())

    @property
    def write_steps(self) -> frozenset[int]:
        """Full steps followed by a cached step: the only writes a read can see."""
        return frozenset(s - 1 for s in self.reuse_steps if s - 1 not in self.reuse_steps and s > 0)

    def mode(self, step: int) -> str | None:
        """``"reuse"``, ``"store"`` or None (a plain full forward) for ``step``."""
        if step in self.reuse_steps:
            return "reuse"
        if step in self.write_steps:
            return "store"
        return None


class FrameBuffer:
    """One branch's buffers over ``num_frames`` absolute latent frames (this rank's sequence shard)."""

    def __init__(self, num_frames: int, host: bool = False) -> None:
        self.num_frames = num_frames
        self.host = host
        """Keep the rows in (pinned) host memory; reads return them on the device they were written from."""
        self.device: torch.device | None = None  # where the rows come from and reads go to
        self.img: torch.Tensor | None = None  # [num_frames, F_local, D]
        self.writer = [-1] * num_frames  # window id whose reference/text rows slot k holds
        self.heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # window id -> (ref [F_local, D], txt [L, D])

    def write(self, window: int, frames: list[int], cached: CachedInput) -> None:
        """Window ``window`` over absolute ``frames`` stores its last-single-block input (batch of one)."""
        rows = cached.img[0]  # [T+1, F_local, D], frame 0 = reference
        if rows.shape[0] != len(frames) + 1:
            raise ValueError(f"cache write of {rows.shape[0] - 1} frames for a window of {len(frames)}")
        txt = cached.txt[0]
        if self.img is None:
            self.device = rows.device
            if self.host:
                pin = torch.cuda.is_available()
                self.img = torch.zeros((self.num_frames, *rows.shape[1:]), dtype=rows.dtype, pin_memory=pin)
            else:
                self.img = rows.new_zeros((self.num_frames, *rows.shape[1:]))
        if self.host:
            rows, txt = rows.to("cpu"), txt.to("cpu")
        index = torch.as_tensor(frames, dtype=torch.long, device=rows.device)
        self.img.index_copy_(0, index, rows[1:])
        self.heads[window] = (rows[0].clone(), txt.clone())
        for k in frames:
            self.writer[k] = window
        live = set(self.writer)
        for old in [w for w in self.heads if w not in live]:
            del self.heads[old]

    def read(self, frames: list[int]) -> CachedInput:
        """The cached input of a window over absolute ``frames``."""
        owner = self.writer[frames[0]]
        if self.img is None or owner < 0 or any(self.writer[k] < 0 for k in frames):
            raise RuntimeError(f"deep cache read of frames {frames[:4]}… before any full step wrote them")
        ref, txt = self.heads[owner]
        index = torch.as_tensor(frames, dtype=torch.long, device=self.img.device)
        img = torch.cat([ref[None], self.img.index_select(0, index)])
        if self.host:
            img, txt = img.to(self.device), txt.to(self.device)
        return CachedInput(img=img[None], txt=txt[None])

    @property
    def nbytes(self) -> int:
        total = 0 if self.img is None else self.img.numel() * self.img.element_size()
        for ref, txt in self.heads.values():
            total += ref.numel() * ref.element_size() + txt.numel() * txt.element_size()
        return total

    @property
    def image_nbytes(self) -> int:
        return 0 if self.img is None else self.img.numel() * self.img.element_size()


@dataclass
class CacheStats:
    """What the run report records about the cache (per rank): peaks of the bytes held by all live caches of this
    process (so a segment's cache that was not freed would show)."""

    peak_bytes: int = 0
    peak_image_bytes: int = 0
    writes: int = 0


_LIVE: weakref.WeakSet = weakref.WeakSet()


def live_bytes() -> int:
    """Bytes held by the deep caches of this process that are not freed."""
    return sum(cache.nbytes for cache in list(_LIVE))


def live_image_bytes() -> int:
    return sum(cache.image_nbytes for cache in list(_LIVE))


@dataclass(eq=False)
class DeepCache:
    """The buffers of every branch this rank computes, over one denoised domain (a whole ``shift``/``blend``
    video, or one ``segments`` segment). Writes of one step are staged and applied in window order by ``commit``."""

    plan: CachePlan
    num_frames: int
    host: bool = False
    """The buffers in (pinned) host memory (``FrameBuffer.host``)."""
    stats: CacheStats = field(default_factory=CacheStats)
    buffers: dict[int, FrameBuffer] = field(default_factory=dict)
    staged: dict[int, dict[int, tuple[list[int], CachedInput]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _LIVE.add(self)

    def mode(self, step: int) -> str | None:
        return self.plan.mode(step)

    def read(self, branch: int, frames: list[int]) -> CachedInput:
        return self.buffers[branch].read(frames)

    def stage(self, branch: int, window: int, frames: list[int], cached: CachedInput) -> None:
        self.staged.setdefault(window, {})[branch] = (list(frames), cached)

    def commit(self, data_group=None) -> None:
        """Apply the staged writes of this step in window order (after exchanging them over ``data_group``)."""
        if not self.staged:
            return
        staged = self.staged
        if comm.group_size(data_group) > 1:
            staged = _exchange(staged, data_group)
        for window in sorted(staged):
            for branch, (frames, cached) in sorted(staged[window].items()):
                buffer = self.buffers.setdefault(branch, FrameBuffer(self.num_frames, self.host))
                buffer.write(window, frames, cached)
        self.staged = {}
        self.stats.writes += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, live_bytes())
        self.stats.peak_image_bytes = max(self.stats.peak_image_bytes, live_image_bytes())

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def image_nbytes(self) -> int:
        return sum(b.image_nbytes for b in self.buffers.values())

    def free(self) -> None:
        self.buffers.clear()
        self.staged = {}
        _LIVE.discard(self)


def _exchange(staged: dict, data_group) -> dict:
    """Every data group's staged windows, on every rank (the tensors travel packed as one per window/branch)."""
    device = None
    packed: dict[int, torch.Tensor] = {}
    meta: dict[int, tuple[int, int, list[int], tuple]] = {}
    for window, branches in staged.items():
        for branch, (frames, cached) in branches.items():
            key = window * 2 + branch
            device = cached.img.device
            packed[key] = torch.cat([cached.img.flatten(1, 2), cached.txt], dim=1)
            meta[key] = (window, branch, frames, tuple(cached.img.shape))
    metas = comm.all_gather_object(meta, data_group)
    gathered = comm.data_all_gather_windows(packed, data_group, device=device)
    out: dict = {}
    for part in metas:
        for key, (window, branch, frames, img_shape) in part.items():
            tensor = gathered[key]
            num_img = img_shape[1] * img_shape[2]
            cached = CachedInput(img=tensor[:, :num_img].unflatten(1, img_shape[1:3]), txt=tensor[:, num_img:])
            out.setdefault(window, {})[branch] = (frames, cached)
    return out
