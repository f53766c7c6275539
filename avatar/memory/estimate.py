"""The per-rank memory plan: what one rank holds at each stage of a render, and which ``memory.mode`` fits.

Every number comes from ``avatar/memory/measure.py`` (our real modules on meta/fake tensors); this file only decides
*which* of them sit on one GPU together, stage by stage:

- ``encode`` (the group's rank 0, once per job): the DiT weights at rest, the VAE weights and the text/audio
  encoders (unless ``Placement.encoders_on_cpu``). The encoders are released right after the text conditioning
  (``avatar/pipeline/run.py``), so they never sit beside a VAE tile or the DiT's activations.
- ``reference`` (rank 0): the DiT weights at rest, the VAE weights and one VAE encode tile (the reference latents).
- ``denoise`` (every rank): the DiT weights at rest plus the blocks in flight (FSDP2: the current and the prefetched
  block unsharded; block offload: the current and the prefetched block streamed in), the VAE weights, one DiT
  forward's activation peak at this rank's token count (``token_chunk`` applied), the deep-cache buffers of this
  rank's CFG branches (in host memory with ``Placement.cache_on_host``) and the latents of the clip.
- ``decode`` (every rank): the DiT weights at rest, the VAE weights and one VAE decode tile.

The peak of a rank is the largest stage. Weights at rest: the whole DiT (``none``, ``fp8``); its blocks sharded over
the ranks of one video plus the non-block weights (``fsdp``); nothing under offload (group offloading: the weights
live on the host outside the DiT's forward; in it, the non-block weights and two blocks (``blocks``) or the whole
DiT (``model``) are on the GPU).

``memory=auto`` takes the first mode of ``AUTO_ORDER`` whose peak fits the GPU memory (minus ``HEADROOM``);
none fitting is an ``InputError`` naming the need, the memory and what would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from avatar.config import FPS, MemoryConfig, MemoryMode, ModelConfig, Offload, Shard
from avatar.io.errors import InputError
from avatar.memory import measure
from avatar.memory.modes import AUTO_ORDER, Placement, placement, tiled_model

GB = 10**9
#: Fraction of a GPU's memory kept free for the CUDA caching allocator's fragmentation, kernels' workspaces and
#: the NCCL buffers, which the measurement does not see.
HEADROOM = 0.05
#: Blocks of the DiT in flight in a forward under FSDP2 or block offload: the one running and the one prefetched.
BLOCKS_IN_FLIGHT = 2
#: Latent copies of the whole clip a rank keeps during the denoise (noise, the state, the strategy's accumulator).
LATENT_COPIES = 3


@dataclass(frozen=True)
class Geometry:
    """What is rendered: the bucketed video size, its length and the speakers (audio tracks) driving it."""

    width: int
    height: int
    num_frames: int
    speakers: int = 1

    @property
    def seconds(self) -> float:
        return self.num_frames / FPS

    def describe(self) -> str:
        who = f", {self.speakers} speakers" if self.speakers > 1 else ""
        return f"{self.width}x{self.height}, {self.num_frames} frames ({self.seconds:.1f} s){who}"


def planning_geometry(model: ModelConfig, seconds: float, size: tuple[int, int] | None = None) -> Geometry:
    """``size`` (width, height), or the official examples' near-square portrait: ``image_size`` × (``image_size`` +
    ``bucket_multiple``) (704 → 704×768), for a clip of ``seconds`` (at least one video frame)."""
    width, height = size if size is not None else (model.image_size, model.image_size + model.bucket_multiple)
    return Geometry(int(width), int(height), max(1, int(round(seconds * FPS))))


@dataclass(frozen=True)
class Stage:
    """Bytes one rank holds together at one stage, part by part."""

    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{name} {gb(value)}" for name, value in self.parts.items() if value)
        return f"{self.name} {gb(self.total)} ({shown})"


@dataclass(frozen=True)
class Estimate:
    """The stages of one rank under one placement, against the GPU memory (None: unknown)."""

    placement: Placement
    stages: tuple[Stage, ...]
    gpu_bytes: int | None
    token_chunk: int | None

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda stage: stage.total)

    @property
    def peak(self) -> int:
        return self.peak_stage.total

    @property
    def usable(self) -> int | None:
        return None if self.gpu_bytes is None else int(self.gpu_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.usable is None or self.peak <= self.usable

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def describe(self) -> str:
        """``X GB of G GB (peak at <stage>: parts; other stages)`` — the ``peak per rank:`` line."""
        of = "" if self.gpu_bytes is None else f" of {gb(self.gpu_bytes)}"
        peak = self.peak_stage
        others = "; ".join(stage.describe() for stage in self.stages if stage is not peak)
        return f"{gb(self.peak)}{of} (peak at {peak.describe()}; {others})"

    def as_dict(self) -> dict:
        return {
            "mode": self.placement.mode.value,
            "placement": {
                "shard": self.placement.shard.value,
                "offload": self.placement.offload.value,
                "fp8": self.placement.fp8,
                "cache_on_host": self.placement.cache_on_host,
                "encoders_on_cpu": self.placement.encoders_on_cpu,
            },
            "token_chunk": self.token_chunk,
            "gpu_bytes": self.gpu_bytes,
            "peak_bytes": self.peak,
            "peak_stage": self.peak_stage.name,
            "stages": {stage.name: dict(stage.parts) for stage in self.stages},
        }


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement, its estimate and why it was chosen."""

    estimate: Estimate
    why: str
    tried: tuple[Estimate, ...] = field(default=(), compare=False)

    @property
    def placement(self) -> Placement:
        return self.estimate.placement

    @property
    def mode(self) -> MemoryMode:
        return self.estimate.placement.mode

    def lines(self) -> list[str]:
        """The ``memory:`` and ``peak per rank:`` lines of ``launch.plan`` and the log."""
        return [f"memory: {self.mode.value} ({self.why})", f"peak per rank: {self.estimate.describe()}"]

    def as_dict(self) -> dict:
        return {**self.estimate.as_dict(), "why": self.why}


def gb(value: int) -> str:
    """``12.3 GB`` (10^9 bytes); under 0.1 GB in MB (the tiny model)."""
    return f"{value / GB:.1f} GB" if value >= GB // 10 else f"{value / 10**6:.1f} MB"


# --- the estimate ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """What of the parallel plan the memory depends on."""

    world: int
    data: int
    cfg: int
    sequence: int

    @classmethod
    def of(cls, plan) -> Ranks:
        """From a ``avatar.plan.ParallelPlan`` (or anything with ``world_size``, ``data``, ``cfg``,
        ``sequence_size``), or a ``Ranks``."""
        if isinstance(plan, Ranks):
            return plan
        return cls(world=plan.world_size, data=plan.data, cfg=plan.cfg, sequence=plan.sequence_size)

    @property
    def world_size(self) -> int:
        return self.world

    @property
    def video(self) -> int:
        """Ranks rendering one video together (the FSDP2 shard group): cfg × ring × ulysses."""
        return self.cfg * self.sequence


def text_tokens(model: ModelConfig) -> int:
    """Text tokens of the DiT (``avatar/models/text.py``: text_len + text_image_tokens − 1; official 831)."""
    return model.text_len + model.text_image_tokens - 1


def tokens_per_frame(model: ModelConfig, geometry: Geometry) -> int:
    _, ph, pw = model.patch_size
    return (geometry.height // model.vae_spatial_ratio // ph) * (geometry.width // model.vae_spatial_ratio // pw)


def estimate(
    plan,
    model: ModelConfig,
    geometry: Geometry,
    gpu_bytes: int | None,
    chosen: Placement,
    *,
    token_chunk: int | None = 8192,
    deep_cache: bool = True,
    strategy: str = "auto",
    auto_segments_seconds: float = 20.0,
    overlap: int | None = None,
    weights_dir: str | None = None,
    fp8: bool = False,
    cache: measure.MeasureCache | None = None,
) -> Estimate:
    """One rank's stages (the group's rank 0, which also encodes) for ``plan`` (a ``ParallelPlan``) rendering
    ``geometry`` with ``model`` under ``chosen``. ``fp8``: the run asked for the fp8 checkpoint (``fp8=true``)."""
    from avatar.pipeline import strategies as strat

    ranks = Ranks.of(plan)
    use_fp8 = chosen.fp8 or fp8
    weights = measure.dit_weight_bytes(model, torch.bfloat16, fp8=use_fp8)
    non_block = weights["total"] - weights["blocks"]
    in_flight = BLOCKS_IN_FLIGHT * weights["largest_block"]
    if chosen.offload != Offload.none:
        # Group offloading keeps every weight on the host outside the DiT's forward; inside it the non-block
        # weights and the blocks in flight (``blocks``) or the whole model (``model``) are on the GPU.
        at_rest = 0
        flight = non_block + in_flight if chosen.offload == Offload.blocks else weights["total"]
    elif chosen.shard == Shard.fsdp and ranks.video > 1:
        at_rest, flight = non_block + measure.ceil_div(weights["blocks"], ranks.video), in_flight
    else:
        at_rest, flight = weights["total"], 0

    # The clip's strategy and the largest window one forward sees, at this rank's share of every frame's tokens.
    name = strat.choose(strategy, geometry.num_frames, _LongView(auto_segments_seconds))
    lap = overlap if overlap is not None else max(1, strat.window_latents(model) // 4)
    clip = strat.make(name, model, geometry.num_frames, lap, "official")
    window = max(len(frames) for frames in clip.windows(0))
    local_tokens = measure.ceil_div(tokens_per_frame(model, geometry), ranks.sequence)
    chunk = token_chunk or None
    activations = measure.dit_activation_bytes(
        model,
        window,
        local_tokens,
        text_tokens(model),
        fp8=use_fp8,
        token_chunk=chunk,
        cache=cache,
        speakers=geometry.speakers,
    )
    # The clip's Whisper features on the device (fp32), one set per speaker track.
    feature_bytes = 4 * geometry.speakers * geometry.num_frames * model.audio_window * model.audio_layers
    feature_bytes *= model.audio_channels
    branches = 1 if ranks.cfg == 2 else 2
    cache_bytes = 0
    if deep_cache and not chosen.cache_on_host:
        # ``segments`` denoises one segment at a time, each with its own cache (freed when it ends).
        one = strat.make("shift", model, model.window_frames, lap, "official") if name == "segments" else clip
        cache_bytes = measure.deep_cache_bytes(one, local_tokens, text_tokens(model), model.hidden_size, branches)
    latent_bytes = (
        LATENT_COPIES
        * 4
        * model.latent_channels
        * clip.domain
        * (geometry.height // model.vae_spatial_ratio)
        * (geometry.width // model.vae_spatial_ratio)
    )
    vae = measure.vae_bytes(tiled_model(model, chosen), torch.float16, cache=cache)
    encoders = measure.encoder_weight_bytes(model, weights_dir, cache=cache)
    stages = (
        Stage(
            "encode",
            {
                "DiT weights": at_rest,
                "encoders": 0 if chosen.encoders_on_cpu else sum(encoders.values()),
                "VAE": vae["weights"],
            },
        ),
        Stage("reference", {"DiT weights": at_rest, "VAE": vae["weights"], "VAE tile": vae["encode_tile"]}),
        Stage(
            "denoise",
            {
                "DiT weights": at_rest + flight,
                "activations": activations,
                "deep cache": cache_bytes,
                "latents": latent_bytes,
                "audio features": feature_bytes,
                "VAE": vae["weights"],
            },
        ),
        Stage("decode", {"DiT weights": at_rest, "VAE": vae["weights"], "VAE tile": vae["tile"]}),
    )
    return Estimate(chosen, stages, gpu_bytes, chunk)


@dataclass(frozen=True)
class _LongView:
    """The one field of ``LongConfig`` that ``strategies.choose`` reads, for plans made without a ``RunConfig``."""

    auto_segments_seconds: float

    @property
    def long(self) -> _LongView:
        return self


# --- choosing a mode -------------------------------------------------------------------------------------------------


def resolve(
    memory: MemoryConfig,
    plan,
    model: ModelConfig,
    geometry: Geometry,
    gpu_bytes: int | None,
    widen=None,
    **kwargs,
) -> MemoryPlan:
    """The ``MemoryPlan`` for ``memory.mode`` (``auto``: the first of ``AUTO_ORDER`` that fits ``gpu_bytes``).
    Raises ``InputError`` (exit 2) when the mode asked for, or every mode, needs more than the GPU has.
    ``widen(world)``: the parallel plan the launch would use on ``world`` GPUs (for "what would fit"; default:
    cfg 2 and the rest sequence-parallel); ``kwargs``: those of ``estimate``."""
    kwargs["widen"] = widen or _wider_plan
    kwargs.setdefault("token_chunk", memory.token_chunk or None)
    requested = MemoryMode(memory.mode)
    where = f"{geometry.describe()} on {plan.world_size} × {gb(gpu_bytes) if gpu_bytes is not None else '?'}"
    if requested != MemoryMode.auto:
        chosen = _estimate(plan, model, geometry, gpu_bytes, placement(memory, requested), kwargs)
        if not chosen.fits:
            raise InputError(
                f"memory={requested.value} needs {gb(chosen.peak)} per rank for {where} "
                f"({chosen.peak_stage.describe()}), more than the {gb(chosen.usable)} usable"
                f"{_what_would_fit(memory, plan, model, geometry, gpu_bytes, kwargs)}"
            )
        return MemoryPlan(chosen, f"memory={requested.value} given")
    if gpu_bytes is None:
        chosen = _estimate(plan, model, geometry, None, placement(memory, MemoryMode.none), kwargs)
        return MemoryPlan(chosen, "auto: no GPU memory to plan for (CPU; memory.gpu_memory_gb sets one)", (chosen,))
    tried = []
    for mode in AUTO_ORDER:
        candidate = _estimate(plan, model, geometry, gpu_bytes, placement(memory, mode), kwargs)
        tried.append(candidate)
        if candidate.fits:
            refused = ", ".join(f"{e.placement.mode.value} {gb(e.peak)}" for e in tried[:-1])
            why = f"auto: the first of {'/'.join(m.value for m in AUTO_ORDER)} that fits {gb(candidate.usable)} usable"
            return MemoryPlan(candidate, why + (f"; too big: {refused}" if refused else ""), tuple(tried))
    smallest = min(tried, key=lambda e: e.peak)
    raise InputError(
        f"no memory mode fits {where}: the smallest need is memory={smallest.placement.mode.value} at "
        f"{gb(smallest.peak)} per rank ({smallest.peak_stage.describe()}), more than the {gb(smallest.usable)} usable"
        f"{_what_would_fit(memory, plan, model, geometry, gpu_bytes, kwargs)}"
    )


def _estimate(plan, model, geometry, gpu_bytes, chosen, kwargs) -> Estimate:
    return estimate(plan, model, geometry, gpu_bytes, chosen, **{k: v for k, v in kwargs.items() if k != "widen"})


def _first_fit(memory, plan, model, geometry, gpu_bytes, kwargs) -> Estimate | None:
    for mode in AUTO_ORDER:
        candidate = _estimate(plan, model, geometry, gpu_bytes, placement(memory, mode), kwargs)
        if candidate.fits:
            return candidate
    return None


def _what_would_fit(memory, plan, model, geometry, gpu_bytes, kwargs) -> str:
    """``; would fit: ...``: fp8 / memory=low on this GPU, a GPU that is large enough, more GPUs, a smaller
    ``model.image_size``."""
    options = []
    if gpu_bytes is not None:
        for mode in (MemoryMode.fp8, MemoryMode.low):
            if (
                mode != MemoryMode(memory.mode)
                and _estimate(plan, model, geometry, gpu_bytes, placement(memory, mode), kwargs).fits
            ):
                options.append(f"memory={mode.value}")
        if not options:
            low = _estimate(plan, model, geometry, None, placement(memory, MemoryMode.low), kwargs)
            options.append(f"a GPU with ≥ {gb(math.ceil(low.peak / (1 - HEADROOM)))} (memory=low)")
        not_fitting = []
        for world in (2, 4, 8, 16, 32, 64):
            if world <= plan.world_size:
                continue
            wider = kwargs["widen"](world)
            fit = _first_fit(memory, wider, model, geometry, gpu_bytes, kwargs)
            if fit is not None:
                options.append(f"{world} GPUs (memory={fit.placement.mode.value})")
                break
        else:
            not_fitting.append("up to 64 GPUs")
        step = model.bucket_multiple
        sizes = list(range(model.image_size - step, step * 3, -step))
        for size in sizes:
            scale = size / model.image_size
            smaller = replace(
                geometry,
                width=max(step, round(geometry.width * scale / step) * step),
                height=max(step, round(geometry.height * scale / step) * step),
            )
            fit = _first_fit(memory, plan, model, smaller, gpu_bytes, kwargs)
            if fit is not None:
                options.append(f"model.image_size={size} (memory={fit.placement.mode.value})")
                break
        else:
            if sizes:
                not_fitting.append(f"model.image_size down to {sizes[-1]}")
        if not_fitting:
            options.append(f"not {' nor '.join(not_fitting)} on {gb(gpu_bytes)} GPUs")
    return "; would fit: " + ", ".join(options) if options else ""


@dataclass(frozen=True)
class _Plan:
    """A parallel plan's sizes for "what if there were more GPUs" (cfg 2 and the rest sequence-parallel)."""

    world_size: int
    data: int
    cfg: int
    sequence_size: int


def _wider_plan(world: int) -> _Plan:
    cfg = 2 if world % 2 == 0 else 1
    return _Plan(world_size=world, data=1, cfg=cfg, sequence_size=world // cfg)


# --- the geometry of a launch ----------------------------------------------------------------------------------------


def jobs_geometry(model: ModelConfig, jobs: list) -> Geometry:
    """The largest bucketed size and the longest clip of ``jobs`` (image headers and the audio containers'
    declared lengths: nothing is decoded; a container without a length counts as one window)."""
    from PIL import Image

    from avatar.io.audio import container_seconds
    from avatar.io.image import bucket_size

    width = height = 0
    num_frames = model.window_frames
    speakers = max([1] + [_tracks(job) for job in jobs])
    for job in jobs:
        with Image.open(job.image) as image:
            w, h = bucket_size(*image.size, model.image_size, model.bucket_multiple)
        if w * h > width * height:
            width, height = w, h
        audio_files = job.audio_files().values() if hasattr(job, "audio_files") else [job.audio]
        for audio in audio_files:  # several speakers: the longest track
            seconds = container_seconds(audio)
            if seconds is not None:
                num_frames = max(num_frames, int(math.ceil(seconds * FPS)))
    if not width:
        return planning_geometry(model, model.window_frames / FPS)
    return Geometry(width, height, num_frames, speakers)


def _tracks(job) -> int:
    """Audio tracks the DiT gets for ``job``: one per speaker with several tracks, else one (turns share one)."""
    spec = getattr(job, "speakers", None)
    return 1 if spec is None or spec.turns else len(spec)
