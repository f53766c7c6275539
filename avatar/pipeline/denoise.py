"""The denoise stage: callable on its own with explicit noise and precomputed conditioning.

``denoise(model, cond, noise, sampling, long, topology)`` runs the flow-matching Euler loop over the whole latent
video with one of the long-audio strategies:

- ``shift``: the official scheme (circular windows whose grid moves by ``shift_offset`` every step, averaged with a
  counter, official dtype roundings with ``fidelity=official``), without the official 400-frame cap.
- ``blend``: fixed overlapping windows denoised in lockstep; after every step the overlaps are averaged with smooth
  weights.
- ``segments``: handled by ``denoise_window_to_end`` per segment (see ``avatar/pipeline/run.py``).

Windows of one step are spread over the data-parallel groups and their results are combined in window order, so the
result does not depend on the number of groups. Classifier-free guidance runs both branches in one batch, or one
branch per CFG-parallel half with one exchange per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from avatar.config import ModelConfig, SamplingConfig
from avatar.pipeline import schedule as sched
from avatar.pipeline import windows as win
from avatar.pipeline.topology import Topology
from avatar.progress import progress

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything the DiT is conditioned on, for the whole video (``save_intermediates=true`` saves this)."""

    audio_feats: torch.Tensor  # [N, audio_window, audio_layers, audio_channels], N video frames (padded as needed)
    face_mask: torch.Tensor  # [1, 1, 1, h, w] at latent resolution
    text_states: torch.Tensor  # [1, L, Dt] positive prompt
    text_mask: torch.Tensor  # [1, L]
    text_pooled: torch.Tensor  # [1, D2]
    neg_text_states: torch.Tensor  # [1, L, Dt] negative prompt
    neg_text_mask: torch.Tensor  # [1, L]
    neg_text_pooled: torch.Tensor  # [1, D2]
    ref_latents: torch.Tensor  # [1, C, T_window, h, w]
    num_frames: int  # video frames wanted (the audio's length at fps)

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
    model_calls: int = 0
    cached_calls: int = 0
    cache: str = "off"
    resumed_from_step: int | None = None
    windows: list[dict] = field(default_factory=list)


class GuidedVelocity:
    """Model + two-phase CFG + cache reuse for one window at one step."""

    def __init__(
        self,
        model: torch.nn.Module,
        cond: Conditioning,
        sampling: SamplingConfig,
        arch: ModelConfig,
        topology: Topology,
        compute_dtype: torch.dtype,
        use_cache: bool,
        stats: DenoiseStats,
    ) -> None:
        self.model = model
        self.cond = cond
        self.sampling = sampling
        self.arch = arch
        self.topo = topology
        self.dtype = compute_dtype
        self.use_cache = use_cache
        self.cached = sched.cached_steps(sampling.steps) if use_cache else frozenset()
        self.stats = stats
        self.cache_store: dict = {}

    def branches(self, step: int) -> list[int]:
        """Branch indices this rank computes: 0 = unconditional, 1 = conditional."""
        if self.topo.cfg_size == 2:
            return [self.topo.cfg_rank]
        return [0, 1]

    def __call__(self, x: torch.Tensor, t: float, step: int, audio: torch.Tensor, cache_key) -> torch.Tensor:
        """x ``[1, C, T, h, w]``; audio ``[4T-3, window, layers, channels]``. Returns the guided velocity (fp32)."""
        c = self.cond
        phase = sched.cfg_phase(step, self.sampling)
        mask_scale = sched.face_mask_scale(step, self.sampling)
        branches = self.branches(step)
        dtype = self.dtype
        # Shared by both branches; only the text and the audio differ.
        common = dict(
            x=x.to(dtype),
            t=torch.full((1,), float(t), dtype=torch.float32, device=x.device),
            ref_latents=c.ref_latents.to(dtype),
            face_mask=(c.face_mask * mask_scale).to(dtype),
        )
        outputs, reused = [], False
        # One forward per branch, also when this rank computes both: a batch of one is what a CFG-parallel rank
        # runs, so every plan gives bit-identical latents (a batch of two rounds differently in the matmuls).
        for b in branches:
            negative = b == 0 and phase == "joint"
            kwargs = dict(
                common,
                text_states=(c.neg_text_states if negative else c.text_states).to(dtype),
                text_mask=c.neg_text_mask if negative else c.text_mask,
                text_states_2=(c.neg_text_pooled if negative else c.text_pooled).to(dtype),
                audio_feats=(torch.zeros_like(audio) if b == 0 else audio).unsqueeze(0).to(dtype),
            )
            key = (cache_key, b)
            if step in self.cached and key in self.cache_store:
                outputs.append(self.model(**kwargs, cache="reuse", cached=self.cache_store[key]))
                reused = True
            elif self.use_cache:
                v, self.cache_store[key] = self.model(**kwargs, cache="store")
                outputs.append(v)
            else:
                outputs.append(self.model(**kwargs))
        v = torch.cat(outputs)
        self.stats.model_calls += 1
        self.stats.cached_calls += int(reused)
        v = self.topo.all_gather_cfg(v.float())
        scale = sched.guidance_scale(step, self.sampling)
        return v[0:1] + scale * (v[1:2] - v[0:1])


def denoise_window_strategy(
    model: torch.nn.Module,
    cond: Conditioning,
    noise: torch.Tensor,
    sampling: SamplingConfig,
    arch: ModelConfig,
    strategy: str,
    *,
    overlap: int = 0,
    use_cache: bool | None = None,
    topology: Topology | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The denoise stage on its own: explicit initial noise and precomputed conditioning in, final latents out
    (``shift`` or ``blend``). With the tensors a run saved (``save_intermediates=true``, see
    ``load_intermediates``) this reproduces that run's latents."""
    topo = topology or Topology()
    stats = DenoiseStats(strategy=strategy)
    cache = sampling.cache if use_cache is None else use_cache
    velocity = GuidedVelocity(model, cond, sampling, arch, topo, dtype, cache, stats)
    with torch.inference_mode():
        return denoise_whole_video(velocity, noise, cond, sampling, arch, strategy, overlap, topo)


def denoise_whole_video(
    velocity: GuidedVelocity,
    noise: torch.Tensor,
    cond: Conditioning,
    sampling: SamplingConfig,
    arch: ModelConfig,
    strategy: str,
    overlap: int,
    topo: Topology,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The strategies that denoise the whole video in lockstep: ``shift`` (``overlap`` unused) or ``blend``."""
    resume = dict(on_step=on_step, start_step=start_step, latents=latents)
    if strategy == "shift":
        return denoise_shift(velocity, noise, cond, sampling, arch, topo, **resume)
    if strategy == "blend":
        return denoise_blend(velocity, noise, cond, sampling, arch, overlap, topo, **resume)
    raise ValueError(f"strategy={strategy!r}: the whole-video denoise takes 'shift' or 'blend'")


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


def window_audio(audio_feats: torch.Tensor, start_latent: int, window: int, total_latents: int | None) -> torch.Tensor:
    """Audio rows for a window of ``window`` latents starting at latent ``start_latent``: video frames
    ``4s .. 4s + 4T - 4``; circular over ``4 * total_latents`` frames when ``total_latents`` is given (shift strategy),
    zero past the end otherwise."""
    num_rows = 4 * window - 3
    first = 4 * start_latent
    if total_latents is not None:
        period = 4 * total_latents
        index = torch.tensor([(first + j) % period for j in range(num_rows)])
        padded = _pad_rows(audio_feats, period)
        return padded[index]
    return _pad_rows(audio_feats, first + num_rows)[first : first + num_rows]


def _pad_rows(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] >= length:
        return x
    pad = torch.zeros((length - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def _round_official(x: torch.Tensor, fidelity: str) -> torch.Tensor:
    """The official storage rounding of a stepped window (fp32 → bf16 → fp16 buffer)."""
    if fidelity == "official":
        return x.to(torch.bfloat16).to(torch.float16)
    return x


def denoise_shift(
    velocity: GuidedVelocity,
    noise: torch.Tensor,
    cond: Conditioning,
    sampling: SamplingConfig,
    arch: ModelConfig,
    topo: Topology,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official shifted circular windows; returns ``[1, C, infer_length, h, w]``."""
    window = win.latents_for_frames(arch.window_frames, arch.vae_temporal_ratio)
    infer_length = noise.shape[2]
    sigmas, timesteps = sched.flow_timesteps(sampling.steps, sampling.shift)
    fidelity = sampling.fidelity
    x = noise.clone() if latents is None else latents.clone()
    if fidelity == "official":
        x = x.to(torch.float16).float()
    single = infer_length == window
    for step in steps_range(start_step, sampling.steps, topo):
        if single:
            groups = [list(range(window))]
        else:
            groups = win.shift_windows(step, infer_length, window, arch.shift_offset)
        mine = {}
        for index, idx in enumerate(groups):
            if not topo.owns(index):
                continue
            x_win = x[:, :, idx]
            audio = window_audio(cond.audio_feats, idx[0], window, None if single else infer_length)
            v = velocity(x_win, float(timesteps[step]), step, audio, cache_key=("shift", tuple(idx)))
            stepped = sched.euler_step(x_win, v, float(sigmas[step]), float(sigmas[step + 1]))
            mine[index] = _round_official(stepped, fidelity)
        results = topo.all_gather_data(mine)
        acc_dtype = torch.float16 if fidelity == "official" else torch.float32
        total = torch.zeros_like(x, dtype=acc_dtype)
        counter = torch.zeros(infer_length, dtype=acc_dtype, device=x.device)
        for index, idx in enumerate(groups):
            total[:, :, idx] += results[index].to(acc_dtype)
            counter[idx] += 1
        x = (total / counter.view(1, 1, -1, 1, 1)).float()
        if on_step is not None:
            on_step(step, x)
    return x


def denoise_blend(
    velocity: GuidedVelocity,
    noise: torch.Tensor,
    cond: Conditioning,
    sampling: SamplingConfig,
    arch: ModelConfig,
    overlap: int,
    topo: Topology,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    start_step: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Overlapping windows in lockstep, blended with smooth weights after every step."""
    window = win.latents_for_frames(arch.window_frames, arch.vae_temporal_ratio)
    num_latents = noise.shape[2]
    windows = win.plan_windows(num_latents, window, overlap)
    weights = win.window_weights(windows, num_latents)
    sigmas, timesteps = sched.flow_timesteps(sampling.steps, sampling.shift)
    x = noise.clone() if latents is None else latents.clone()
    for step in steps_range(start_step, sampling.steps, topo):
        mine = {}
        for index, w in enumerate(windows):
            if not topo.owns(index):
                continue
            x_win = _take(x, w.start, window)
            audio = window_audio(cond.audio_feats, w.start, window, None)
            v = velocity(x_win, float(timesteps[step]), step, audio, cache_key=("blend", index))
            mine[index] = sched.euler_step(x_win, v, float(sigmas[step]), float(sigmas[step + 1]))
        results = topo.all_gather_data(mine)
        total = torch.zeros_like(x)
        for index, w in enumerate(windows):
            stop = min(w.start + window, num_latents)
            total[:, :, w.start : stop] += results[index][:, :, : stop - w.start] * weights[index].view(1, 1, -1, 1, 1)
        x = total
        if on_step is not None:
            on_step(step, x)
    return x


class WindowStepper:
    """One window (a ``segments`` segment) stepped on its own: ``stepper(x, step)`` is one guided Euler step."""

    def __init__(
        self,
        velocity: GuidedVelocity,
        cond: Conditioning,
        sampling: SamplingConfig,
        start_latent: int,
        window: int,
        key,
    ) -> None:
        self.velocity = velocity
        self.sigmas, self.timesteps = sched.flow_timesteps(sampling.steps, sampling.shift)
        self.audio = window_audio(cond.audio_feats, start_latent, window, None)
        self.key = key

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        v = self.velocity(x, float(self.timesteps[step]), step, self.audio, cache_key=self.key)
        return sched.euler_step(x, v, float(self.sigmas[step]), float(self.sigmas[step + 1]))


def denoise_window_to_end(
    velocity: GuidedVelocity,
    noise: torch.Tensor,
    cond: Conditioning,
    sampling: SamplingConfig,
    start_latent: int,
    key,
    start_step: int = 0,
) -> torch.Tensor:
    """One window denoised from ``noise`` (or latents after ``start_step`` steps) to the end, on its own."""
    stepper = WindowStepper(velocity, cond, sampling, start_latent, noise.shape[2], key)
    x = noise.clone()
    for step in range(start_step, sampling.steps):
        x = stepper(x, step)
    return x


def _take(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Latent frames ``[start, start + length)``, zero-padded past the end (videos shorter than one window)."""
    part = x[:, :, start : start + length]
    if part.shape[2] < length:
        pad = torch.zeros((*part.shape[:2], length - part.shape[2], *part.shape[3:]), dtype=x.dtype, device=x.device)
        part = torch.cat([part, pad], dim=2)
    return part


def steps_range(start: int, total: int, topo: Topology):
    """Steps ``start..total-1`` with a progress bar on the group's rank 0."""
    return progress(range(start, total), total=total - start, desc="denoise", rank=topo.leader + topo.rank)
