"""The denoise stage: callable on its own with explicit noise and precomputed conditioning.

One guided velocity (:class:`GuidedVelocity`: the two-phase CFG of dossier §4.3, one batch-of-one DiT forward per
branch, the deep cache of ``avatar/pipeline/cache.py`` or the adaptive step cache of ``avatar/pipeline/adaptive.py``
(``sampling.cache=official|adaptive|off``), the official casts) and two loops over it:

- :func:`denoise_lockstep` (``shift``, ``blend``): every step evaluates all windows of the strategy, spread over the
  data-parallel groups, and averages their stepped latents in window order (``stitch.WindowAccumulator``), so the
  result does not depend on the number of groups;
- :func:`denoise_segment` (``segments``): one window from its noise to the end, with its own cache, freed after.

``fidelity=official`` reproduces the official dtypes: inputs as fp16 (the official latent/conditioning dtype), the
face mask scaled in fp16, the DiT under bf16 autocast on CUDA (its fp32 modules included) and its output rounded to
bf16, the guidance combined in bf16, the Euler step in fp32, stored as bf16 into an fp16 buffer divided by an fp16
counter. ``fidelity=fp32`` is an exact float32 path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from avatar.config import ModelConfig, SamplingConfig
from avatar.models.transformer import NUM_MOTION_SCALARS
from avatar.pipeline import schedule as sched
from avatar.pipeline import strategies as strat
from avatar.pipeline.adaptive import AdaptiveCache
from avatar.pipeline.cache import CachePlan, DeepCache, cache_mode
from avatar.pipeline.speakers import window_masks
from avatar.pipeline.stitch import WindowAccumulator
from avatar.pipeline.topology import Topology
from avatar.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything the DiT is conditioned on, for the whole video (``save_intermediates=true`` saves this)."""

    # [N, audio_window, audio_layers, audio_channels], N video frames (padded as needed); several speakers
    # (``avatar/pipeline/speakers.py``): [N, S, audio_window, audio_layers, audio_channels]
    audio_feats: torch.Tensor
    # [1, 1, 1, h, w] at latent resolution; several speakers: [1, S, 1, h, w] (disjoint), or with turns one mask per
    # latent frame of the video [1, S, T, h, w], sliced per window like the audio
    face_mask: torch.Tensor
    text_states: torch.Tensor  # [1, L, Dt] positive prompt
    text_mask: torch.Tensor  # [1, L]
    text_pooled: torch.Tensor  # [1, D2]
    neg_text_states: torch.Tensor  # [1, L, Dt] negative prompt
    neg_text_mask: torch.Tensor  # [1, L]
    neg_text_pooled: torch.Tensor  # [1, D2]
    ref_latents: torch.Tensor  # [1, C, T_window, h, w]
    num_frames: int  # video frames wanted (the audio's length at fps)
    face_found: bool = True  # False: no face in the portrait, the mask covers the whole image

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return Conditioning(**{k: move(v) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})


@dataclass
class DenoiseStats:
    """What the run report records about the loop."""

    strategy: str = ""
    num_latents: int = 0
    infer_length: int = 0
    windows_per_step: int = 0
    window_calls: int = 0  # guided-velocity evaluations (window × step), all data groups together
    cached_window_calls: int = 0  # of which on the cached steps
    forwards: int = 0  # DiT forwards this rank ran (one per CFG branch it computes per window call it owns)
    cached_forwards: int = 0  # of which last-block-only forwards on cached input
    reused_window_calls: int = 0  # cache=adaptive: window calls whose branches reused the last full step (no DiT)
    reused_forwards: int = 0  # branch evaluations this rank reused instead of running (not in ``forwards``)
    cache: str = "off"
    cache_threshold: float | None = None  # cache=adaptive: sampling.cache_threshold
    cache_max_skip: int | None = None  # cache=adaptive: sampling.cache_max_skip
    cache_windows: list[dict] = field(default_factory=list)  # cache=adaptive: full/reused window calls per window
    cache_bytes_per_rank: int = 0  # peak bytes of the deep-cache buffers on this rank
    cache_image_bytes_per_rank: int = 0  # of which image rows (frames × tokens per rank × width × bytes)
    resumed_from_step: int | None = None
    windows: list[dict] = field(default_factory=list)

    def record_cache(self, cache: DeepCache | AdaptiveCache | None, windows: list[dict] | None = None) -> None:
        """The peak bytes of ``cache``; for the adaptive cache also its full/reused window calls per window
        (``windows``: every data group's, from ``AdaptiveCache.window_counts``; None: this rank's, appended)."""
        if cache is not None:
            self.cache_bytes_per_rank = max(self.cache_bytes_per_rank, cache.stats.peak_bytes)
            self.cache_image_bytes_per_rank = max(self.cache_image_bytes_per_rank, cache.stats.peak_image_bytes)
        if isinstance(cache, AdaptiveCache):
            self.cache_threshold, self.cache_max_skip = cache.threshold, cache.max_skip
            counts = windows if windows is not None else cache.window_counts(None)
            for entry in counts:
                entry = dict(entry, window=len(self.cache_windows)) if windows is None else dict(entry)
                entry["full_forwards"], entry["reused_forwards"] = 2 * entry["full"], 2 * entry["reused"]
                self.cache_windows.append(entry)
                self.reused_window_calls += entry["reused"]


class GuidedVelocity:
    """Model + two-phase CFG + deep cache for one window at one step (this rank's CFG branches)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cond: Conditioning,
        sampling: SamplingConfig,
        topology: Topology,
        compute_dtype: torch.dtype,
        stats: DenoiseStats,
    ) -> None:
        self.model = model
        self.cond = cond
        self.sampling = sampling
        self.topo = topology
        self.dtype = compute_dtype
        self.stats = stats
        self.official = sampling.fidelity == "official"
        self.sigmas, self.timesteps = sched.flow_timesteps(sampling.steps, sampling.shift)
        # A batch of one per branch, also when this rank computes both: a batch of one is what a CFG-parallel rank
        # runs, so every plan gives bit-identical latents (a batch of two rounds differently in the matmuls).
        self.branches = [topology.cfg_rank] if topology.cfg_size == 2 else [0, 1]

    def _input(self, t: torch.Tensor) -> torch.Tensor:
        """A floating input as the DiT gets it: through fp16 first under ``fidelity=official``."""
        return (t.half() if self.official else t).to(self.dtype)

    def _autocast(self, device: torch.device):
        if self.official and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(
        self,
        x: torch.Tensor,
        step: int,
        audio: torch.Tensor,
        frames: list[int],
        window: int,
        cache: DeepCache | None,
        mask_frames: list[int] | None = None,
    ) -> torch.Tensor:
        """Guided velocity of window ``window`` over absolute latent ``frames`` (x ``[1, C, T, h, w]``, audio
        ``[4T-3, window, layers, channels]``): fp32, or bf16 under ``fidelity=official``. ``mask_frames``: the
        video's latent frames of a per-frame face mask (default ``frames``; a segment counts its cache frames from 0)."""
        c = self.cond
        phase = sched.cfg_phase(step, self.sampling)
        mask_scale = sched.face_mask_scale(step, self.sampling)
        adaptive = isinstance(cache, AdaptiveCache)
        mode = cache.mode(step) if cache is not None and not adaptive else None
        if adaptive:
            cache.bind(self.topo)
        reuse = adaptive and cache.decide(step, window, frames, x)
        face_mask = c.face_mask
        if face_mask.shape[2] > 1:  # per latent frame (speakers with turns): this window's frames
            face_mask = window_masks(face_mask, frames if mask_frames is None else mask_frames)
        if self.official:  # the official face mask is fp16 and scaled in fp16
            face_mask = face_mask.half() * mask_scale if mask_scale != 1.0 else face_mask.half()
        else:
            face_mask = face_mask * mask_scale
        common = dict(
            x=self._input(x),
            t=self.timesteps[step : step + 1].to(x.device),
            ref_latents=self._input(c.ref_latents),
            face_mask=face_mask.to(self.dtype),
        )
        outputs = []
        for b in self.branches:
            if reuse:  # adaptive: this step's output from the last full step's transformation, no DiT
                outputs.append(cache.reuse(b, window))
                continue
            negative = b == 0 and phase == "joint"
            kwargs = dict(
                common,
                text_states=self._input(c.neg_text_states if negative else c.text_states),
                text_mask=c.neg_text_mask if negative else c.text_mask,
                text_states_2=self._input(c.neg_text_pooled if negative else c.text_pooled),
                audio_feats=self._input(torch.zeros_like(audio) if b == 0 else audio).unsqueeze(0),
                motion_exp=torch.full((1, NUM_MOTION_SCALARS), float(self.sampling.motion_exp), device=x.device),
                motion_pose=torch.full((1, NUM_MOTION_SCALARS), float(self.sampling.motion_pose), device=x.device),
            )
            with self._autocast(x.device):
                if mode == "reuse":
                    out = self.model(**kwargs, cache="reuse", cached=cache.read(b, frames))
                elif mode == "store":
                    out, stored = self.model(**kwargs, cache="store")
                    cache.stage(b, window, frames, stored)
                else:
                    out = self.model(**kwargs)
            if adaptive:
                cache.record(b, window, out)
            outputs.append(out)
        self.stats.forwards += 0 if reuse else len(outputs)
        self.stats.reused_forwards += len(outputs) if reuse else 0
        self.stats.cached_forwards += len(outputs) if mode == "reuse" else 0
        v = torch.cat(outputs)
        v = v.to(torch.bfloat16) if self.official else v.float()
        v = self.topo.all_gather_cfg(v)
        scale = sched.guidance_scale(step, self.sampling)
        return v[0:1] + scale * (v[1:2] - v[0:1])

    def step(
        self,
        x: torch.Tensor,
        step: int,
        audio: torch.Tensor,
        frames: list[int],
        window: int,
        cache: DeepCache | None,
        mask_frames: list[int] | None = None,
    ) -> torch.Tensor:
        """One guided Euler step of the window (fp32)."""
        v = self(x, step, audio, frames, window, cache, mask_frames)
        return sched.euler_step(x, v, self.sigmas[step], self.sigmas[step + 1])


def _count(stats: DenoiseStats, cache: DeepCache | AdaptiveCache | None, step: int, windows: int) -> None:
    stats.window_calls += windows
    if isinstance(cache, DeepCache) and cache.mode(step) == "reuse":
        stats.cached_window_calls += windows


def denoise_lockstep(
    strategy: strat.Strategy,
    velocity: GuidedVelocity,
    noise: torch.Tensor,
    cache: DeepCache | None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """``shift``/``blend``: the whole domain ``[1, C, strategy.domain, h, w]`` from ``noise`` (or ``latents`` after
    ``start_step`` steps) to the end."""
    topo, stats, cond = velocity.topo, velocity.stats, velocity.cond
    x = noise.clone() if latents is None else latents.clone()
    if strategy.accumulate == "official":
        x = x.to(torch.float16).float()
    weights = strategy.weights()
    for step in steps_range(start_step, velocity.sampling.steps, topo):
        windows = strategy.windows(step)
        mine = {}
        for index, frames in enumerate(windows):
            if not topo.owns(index):
                continue
            audio = strategy.window_audio(cond.audio_feats, frames)
            mine[index] = velocity.step(x[:, :, frames], step, audio, frames, index, cache)
        if cache is not None:
            cache.commit(topo.data_group)
        results = topo.all_gather_data(mine)
        acc = WindowAccumulator(x.shape, fidelity=strategy.accumulate, device=x.device)
        for index, frames in enumerate(windows):
            acc.add(index, frames, results[index], None if weights is None else weights[index])
        x = acc.result()
        _count(stats, cache, step, len(windows))
        if on_step is not None:
            on_step(step, x)
    counts = cache.window_counts(topo.data_group) if isinstance(cache, AdaptiveCache) else None
    stats.record_cache(cache, counts)
    return x


def denoise_segment_step(
    velocity: GuidedVelocity,
    strategy: strat.Strategy,
    index: int,
    x: torch.Tensor,
    step: int,
    cache: DeepCache | None,
) -> torch.Tensor:
    """One step of segment ``index`` on its own (its cache spans only its frames, counted from 0)."""
    frames = list(range(strategy.window))
    absolute = strategy.windows(step)[index]
    audio = strategy.window_audio(velocity.cond.audio_feats, absolute)
    stepped = velocity.step(x, step, audio, frames, 0, cache, mask_frames=absolute)
    if cache is not None:
        cache.commit(None)
    acc = WindowAccumulator(x.shape, fidelity=strategy.accumulate, device=x.device)
    acc.add(0, frames, stepped)
    _count(velocity.stats, cache, step, 1)
    return acc.result()


def new_cache(sampling: SamplingConfig, num_frames: int, host: bool = False) -> DeepCache | AdaptiveCache | None:
    """The cache of ``sampling.cache`` over ``num_frames`` latents: the deep cache (``official``; its buffers in host
    memory with ``host``), the adaptive step cache (``adaptive``; a few latent-sized rows, on the device) or None
    (``off``)."""
    mode = cache_mode(sampling.cache)
    if mode == "adaptive":
        return AdaptiveCache(sampling, num_frames)
    if mode == "off":
        return None
    return DeepCache(CachePlan.for_steps(sampling.steps, True), num_frames, host=host)


def denoise_window_strategy(
    model: torch.nn.Module,
    cond: Conditioning,
    noise: torch.Tensor,
    sampling: SamplingConfig,
    arch: ModelConfig,
    strategy: str,
    *,
    overlap: int = 0,
    use_cache: bool | str | None = None,
    topology: Topology | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The denoise stage on its own: explicit initial noise and precomputed conditioning in, final latents of the
    whole domain out (``shift`` or ``blend``). With the tensors a run saved (``save_intermediates=true``, see
    :func:`load_intermediates`) this reproduces that run's latents."""
    from dataclasses import replace

    topo = topology or Topology()
    if use_cache is not None:
        sampling = replace(sampling, cache=use_cache)
    plan = strat.make(strategy, arch, cond.num_frames, overlap, sampling.fidelity)
    if plan.name == "segments":
        raise ValueError("strategy='segments' is rendered per segment by the renderer; use 'shift' or 'blend'")
    stats = DenoiseStats(strategy=strategy)
    velocity = GuidedVelocity(model, cond, sampling, topo, dtype, stats)
    with torch.inference_mode():
        return denoise_lockstep(plan, velocity, noise, new_cache(sampling, plan.domain))


def load_intermediates(path) -> tuple[torch.Tensor, Conditioning, dict]:
    """Read ``<output>.intermediates.pt``: ``(noise, conditioning, extra)`` where ``extra`` holds ``seed``,
    ``strategy``, ``overlap``, ``cache`` and, once the run finished denoising, the final ``latents``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    names = {f.name for f in fields(Conditioning)}
    cond = Conditioning(**{k: v for k, v in data.items() if k in names})
    extra = {k: v for k, v in data.items() if k not in names and k != "noise"}
    return data["noise"], cond, extra


def make_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Initial noise from a CPU generator seeded by the run seed: the same on every rank and world size."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def steps_range(start: int, total: int, topo: Topology):
    """Steps ``start..total-1`` with a progress bar on the group's rank 0."""
    return progress(range(start, total), total=total - start, desc="denoise", rank=topo.leader + topo.rank)
