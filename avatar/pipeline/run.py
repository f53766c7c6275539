"""The pipeline as named stages: load and validate inputs → audio features → face mask → text conditioning →
reference latents → denoise → decode → write video and mux audio.

``Renderer`` holds the models (loaded once per launch) and renders jobs (one video each). Encoders run on rank 0
only and their outputs are broadcast; the DiT runs on every rank under the plan; the VAE decode is split over all
ranks by temporal tiles and rank 0 assembles and streams the frames into ffmpeg.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatar.config import RunConfig
from avatar.io.errors import InputError
from avatar.pipeline import denoise as dn
from avatar.pipeline import windows as win
from avatar.pipeline.resume import Resume, job_state
from avatar.pipeline.state import file_sha256
from avatar.pipeline.topology import Topology

log = logging.getLogger(__name__)


# --- stage contracts ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One video to render."""

    image: str
    audio: str
    prompt: str
    output: str
    seed: int
    steps: int
    strategy: str = "auto"
    videoid: str = ""


@dataclass
class Inputs:
    """Stage 1: the validated, decoded inputs."""

    image: object  # PIL.Image RGB, resized to the bucket
    width: int
    height: int
    wav: np.ndarray  # float32 mono at audio.sample_rate
    num_frames: int  # video frames = audio length at fps (rounded to the nearest frame)
    hashes: dict[str, str]


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Ctx()


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- stage 1: inputs ----------------------------------------------------------------------------------------------


def load_inputs(cfg: RunConfig, image_path: str, audio_path: str) -> Inputs:
    from avatar.io.audio import load_audio
    from avatar.io.image import bucket_size, load_image, resize_to_bucket

    image = load_image(image_path)
    width, height = bucket_size(image.width, image.height, cfg.model.image_size, cfg.model.bucket_multiple)
    image = resize_to_bucket(image, (width, height))
    wav = load_audio(audio_path, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds)
    num_frames = max(1, round(len(wav) * cfg.audio.fps / cfg.audio.sample_rate))
    hashes = {"image": file_sha256(image_path), "audio": file_sha256(audio_path)}
    return Inputs(image=image, width=width, height=height, wav=wav, num_frames=num_frames, hashes=hashes)


# --- strategies ---------------------------------------------------------------------------------------------------


def choose_strategy(requested: str, num_frames: int, cfg: RunConfig) -> str:
    """``auto``: the official ``shift`` scheme for short audio, ``segments`` (bounded memory, partial output) for
    audio longer than ``long.auto_segments_seconds``."""
    if requested != "auto":
        return requested
    seconds = num_frames / cfg.audio.fps
    return "segments" if seconds > cfg.long.auto_segments_seconds else "shift"


def window_latents(cfg: RunConfig) -> int:
    return win.latents_for_frames(cfg.model.window_frames, cfg.model.vae_temporal_ratio)


def default_overlap(cfg: RunConfig) -> int:
    if cfg.long.overlap_frames > 0:
        return cfg.long.overlap_frames
    return max(1, window_latents(cfg) // 4)


def shift_geometry(num_frames: int, cfg: RunConfig) -> tuple[int, int]:
    """(infer_length, latents kept) of the official scheme, generalised to any window length and uncapped."""
    plan = win.official_shift_plan(num_frames, cfg.model.window_frames, cfg.model.vae_temporal_ratio)
    return plan.infer_length, plan.video_length


# --- the renderer -------------------------------------------------------------------------------------------------


class Renderer:
    """Models loaded once; ``render(job)`` makes one video."""

    def __init__(self, cfg: RunConfig, topo: Topology) -> None:
        self.cfg = cfg
        self.topo = topo
        self.device = topo.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.timer = StageTimer()
        weights = Path(cfg.weights)
        with self.timer("load_dit"):
            from avatar.weights.load import load_dit

            self.model = load_dit(
                weights, cfg.model, dtype=self.dtype, device=self.device, fp8=cfg.fp8, load_key=cfg.load_key
            )
            self.model.set_sequence_parallel(topo.seq)
            self.model.eval()
        with self.timer("load_vae"):
            from avatar.config import OFFICIAL_VAE_DIR
            from avatar.models.vae import configure_tiling, load_vae

            vae_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self.vae = load_vae(weights / OFFICIAL_VAE_DIR, dtype=vae_dtype, device=self.device)
            configure_tiling(self.vae, cfg.model)
        self._encoders = None
        self.host_peak_after_load_mb = peak_host_memory_mb()

    # --- stages 2-5 on rank 0 -------------------------------------------------------------------------------------

    def encoders(self):
        if self._encoders is None:
            from avatar.config import (
                OFFICIAL_CLIP_DIR,
                OFFICIAL_FACE_DETECTOR,
                OFFICIAL_LLAVA_DIR,
                OFFICIAL_WHISPER_DIR,
            )
            from avatar.models.audio import AudioFeatureEncoder
            from avatar.models.face import FaceDetector
            from avatar.models.text import TextEncoder

            weights = Path(self.cfg.weights)
            text_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            with self.timer("load_encoders"):
                self._encoders = dict(
                    audio=AudioFeatureEncoder(
                        weights / OFFICIAL_WHISPER_DIR,
                        device=self.device,
                        context_seconds=self.cfg.audio.context_seconds,
                    ),
                    face=FaceDetector(
                        self.cfg.model.face_detector, weights / OFFICIAL_FACE_DETECTOR, device=self.device
                    ),
                    text=TextEncoder(
                        weights / OFFICIAL_LLAVA_DIR,
                        weights / OFFICIAL_CLIP_DIR,
                        self.cfg.model,
                        dtype=text_dtype,
                        device=self.device,
                    ),
                )
        return self._encoders

    def conditioning(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        """Stages 2-5 run on rank 0; the result is broadcast to every rank."""
        cond = None
        if self.topo.is_main:
            cond = self._encode(job, inputs)
        with self.timer("broadcast_conditioning"):
            cond = self.topo.broadcast_object(cond, src=0)
        return cond

    def _encode(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        from avatar.models.face import face_mask
        from avatar.models.vae import encode_reference, reference_pixels

        cfg, enc = self.cfg, self.encoders()
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        with self.timer("audio_features"):
            audio_feats = enc["audio"].features(inputs.wav, inputs.num_frames, window=cfg.model.audio_window)
        with self.timer("face_mask"):
            boxes = enc["face"].detect(inputs.image)
            mask = face_mask((inputs.width, inputs.height), boxes, (h_lat, w_lat))
        with self.timer("text_conditioning"):
            prompt = cfg.sampling.prompt_prefix + job.prompt
            pos = enc["text"].encode(prompt, inputs.image)
            neg = enc["text"].encode(cfg.sampling.negative_prompt, inputs.image)
        with self.timer("reference_latents"):
            pixels = reference_pixels(inputs.image, cfg.model.window_frames)
            generator = (
                torch.Generator(device="cpu").manual_seed(job.seed + 1) if cfg.sampling.reference_sample else None
            )
            ref = encode_reference(self.vae, pixels, generator)
        return dn.Conditioning(
            audio_feats=audio_feats.float().cpu(),
            face_mask=mask.float().cpu(),
            text_states=pos.states.float().cpu(),
            text_mask=pos.mask.cpu(),
            text_pooled=pos.pooled.float().cpu(),
            neg_text_states=neg.states.float().cpu(),
            neg_text_mask=neg.mask.cpu(),
            neg_text_pooled=neg.pooled.float().cpu(),
            ref_latents=ref.float().cpu(),
            num_frames=inputs.num_frames,
        )

    # --- the whole job -----------------------------------------------------------------------------------------------

    def render(self, job: Job, state=None, preemption=None) -> dict:
        """Render one job to ``job.output`` (the group's rank 0 writes). Returns the run report (rank 0) or {}.

        ``state``: a ``StateStore`` for resume (step checkpoints, finished segments, done marks). ``preemption``:
        a ``PreemptionHandler``; once any rank of the group has received its signal, every rank finishes the current
        step, rank 0 saves a checkpoint, and ``Preempted`` is raised on every rank."""
        cfg, topo = self.cfg, self.topo
        start = time.perf_counter()
        self.timer = StageTimer()
        with self.timer("inputs"):
            inputs = load_inputs(cfg, job.image, job.audio)
        cond = self.conditioning(job, inputs)
        strategy = choose_strategy(job.strategy, inputs.num_frames, cfg)
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        stats = dn.DenoiseStats(strategy=strategy)
        sampling = _with_steps(cfg.sampling, job.steps)
        window = window_latents(cfg)
        num_latents = win.latents_for_frames(inputs.num_frames, cfg.model.vae_temporal_ratio)
        if strategy == "shift":
            infer_length, kept = shift_geometry(inputs.num_frames, cfg)
            num_latents_noise = infer_length
        else:
            kept = num_latents
            num_latents_noise = max(num_latents, window) if strategy == "blend" else num_latents
            infer_length = num_latents_noise
        stats.num_latents, stats.infer_length = kept, infer_length
        use_cache = self._cache_allowed(sampling, strategy, infer_length)
        stats.cache = "on" if use_cache else "off"
        cond_dev = cond.to(self.device)
        velocity = dn.GuidedVelocity(self.model, cond_dev, sampling, cfg.model, topo, self.dtype, use_cache, stats)
        noise = dn.make_noise((1, cfg.model.latent_channels, num_latents_noise, h_lat, w_lat), job.seed).to(
            self.device
        )
        saved = None
        if cfg.save_intermediates and topo.is_main:
            saved = {
                "noise": noise.cpu(),
                "seed": job.seed,
                "strategy": strategy,
                "overlap": default_overlap(cfg),
                "cache": use_cache,
                **vars(cond),
            }
            self._save_intermediates(job, saved)
        key = job_state(config_dict(cfg), job)[0] if state is not None else None
        resume = Resume(topo, state, key, strategy, preemption, velocity.cached, sampling.steps, cfg.checkpoint_every)
        from avatar.io.video import VideoWriter

        writer = None
        if topo.is_main:
            writer = VideoWriter(
                job.output,
                cfg.output.fps,
                inputs.width,
                inputs.height,
                audio_path=job.audio,
                crf=cfg.output.crf,
                preset=cfg.output.preset,
            )
        log.info(
            "denoising %d latent frames (%s, %d steps, cache %s) for %s",
            infer_length,
            strategy,
            sampling.steps,
            stats.cache,
            job.output,
        )
        seams = None
        report_path = None
        try:
            with torch.inference_mode():
                if strategy == "segments":
                    seams = self._render_segments(job, cond_dev, noise, sampling, velocity, writer, inputs, resume)
                else:
                    start_step, latents = resume.load(noise.shape)
                    with self.timer("denoise"):
                        latents = dn.denoise_whole_video(
                            velocity,
                            noise,
                            cond_dev,
                            sampling,
                            cfg.model,
                            strategy,
                            default_overlap(cfg),
                            topo,
                            on_step=resume.on_step,
                            start_step=start_step,
                            latents=latents,
                        )
                    if saved is not None:
                        self._save_intermediates(job, {**saved, "latents": latents.cpu()})
                    latents = latents[:, :, :kept]
                    with self.timer("decode_write"):
                        seams = self._decode_to_writer(
                            latents, inputs.num_frames, writer, boundaries=self._boundaries(strategy, kept, cfg)
                        )
            if writer is not None:
                with self.timer("mux"):
                    writer.finish()
            stats.windows = self._window_details(strategy, kept, infer_length, cfg)
            stats.resumed_from_step = resume.resumed_from
            report = {}
            if topo.is_main:
                report = self._report(job, inputs, strategy, stats, seams, time.perf_counter() - start)
                from avatar.io.atomic import atomic_write_json

                # Report and done mark first, the mp4 last: a kill in between leaves a done mark without its output,
                # which a rerun renders again (done means done *and* the output exists); never an unrecognised mp4.
                report_path = job.output + ".json"
                atomic_write_json(report_path, report)
                if state is not None:
                    state.mark_done(key, {"output": os.path.abspath(job.output), "seconds": report["seconds_total"]})
                writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            if report_path is not None:
                Path(report_path).unlink(missing_ok=True)  # never a report beside a video it does not describe
            raise
        if topo.is_main:
            log.info(
                "wrote %s (%d frames, %.1f s) in %.1f s",
                job.output,
                inputs.num_frames,
                inputs.num_frames / cfg.audio.fps,
                report["seconds_total"],
            )
        topo.barrier()
        return report

    def _cache_allowed(self, sampling, strategy: str, infer_length: int) -> bool:
        if not sampling.cache:
            return False
        if strategy == "shift" and self.topo.data_size > 1:
            log.info(
                "sampler cache off: the shift strategy's per-frame cache is shared by all windows of a step, which data-parallel groups do not share"
            )
            return False
        if infer_length > self.cfg.long.max_cache_frames:
            log.info(
                "sampler cache off: %d latent frames exceed long.max_cache_frames=%d",
                infer_length,
                self.cfg.long.max_cache_frames,
            )
            return False
        return True

    def _boundaries(self, strategy: str, kept: int, cfg: RunConfig) -> list[int]:
        """Video-frame indices where one window's frames meet the next (for the seam report)."""
        window = window_latents(cfg)
        ratio = cfg.model.vae_temporal_ratio
        if strategy == "shift":
            return [4 * s for s in range(window, kept, window)]
        windows = win.plan_windows(kept, window, default_overlap(cfg))
        return [ratio * w.start for w in windows[1:]]

    def _window_details(self, strategy: str, kept: int, infer_length: int, cfg: RunConfig) -> list[dict]:
        window = window_latents(cfg)
        if strategy == "shift":
            return [{"start_latent": s, "latents": window, "circular": True} for s in range(0, infer_length, window)]
        return [
            {"start_latent": w.start, "latents": window} for w in win.plan_windows(kept, window, default_overlap(cfg))
        ]

    # --- decode -----------------------------------------------------------------------------------------------------

    def _decode_to_writer(
        self, latents: torch.Tensor, num_frames: int, writer, boundaries: list[int], first_frame: int = 0
    ):
        """Decode ``latents`` split over all ranks by temporal tiles; rank 0 streams uint8 frames into the writer.
        Returns the seam report (rank 0)."""
        from avatar.pipeline.seams import SeamMeter

        meter = SeamMeter(boundaries) if self.topo.is_main else None
        written = 0
        for uint8 in self._decoded_uint8(latents):
            uint8 = uint8[: max(0, num_frames - written)]
            if uint8.shape[0] == 0:
                continue
            writer.write(uint8)
            meter.add(uint8)
            written += uint8.shape[0]
        return meter.report() if meter is not None else None

    # --- segments -----------------------------------------------------------------------------------------------------

    def _render_segments(self, job, cond, noise, sampling, velocity, writer, inputs, resume):
        """Overlapping segments, each denoised to the end on its own (one per data group in each round), decoded as
        soon as its round is done and cross-faded into the stream; every finished stretch is also written as a
        playable mp4 with its audio, listed in ``<output>.segments/manifest.json``. Finished segments are kept in the
        resume state; a preempted round is checkpointed at its step and continued from there."""
        from avatar.pipeline.segments import SegmentStreamer

        cfg, topo = self.cfg, self.topo
        window = window_latents(cfg)
        kept = win.latents_for_frames(inputs.num_frames, cfg.model.vae_temporal_ratio)
        segments = win.plan_windows(kept, window, default_overlap(cfg))
        streamer = SegmentStreamer(job.output, inputs, segments, window, cfg, enabled=topo.is_main)
        finished = resume.finished_segments()
        ckpt_step, ckpt = resume.load_round()
        num_rounds = -(-len(segments) // topo.data_size)
        for r in range(num_rounds):
            indices = range(r * topo.data_size, min((r + 1) * topo.data_size, len(segments)))
            results = resume.load_segments([i for i in indices if i in finished])
            todo = [i for i in indices if i not in results]
            if todo:
                starts = {i: ckpt_step if i in ckpt else 0 for i in todo}
                mine = {}
                for i in todo:
                    if topo.owns(i):
                        resumed = ckpt.get(i)
                        mine[i] = (
                            resumed.to(self.device)
                            if resumed is not None
                            else dn._take(noise, segments[i].start, window)
                        )
                steppers = {
                    i: dn.WindowStepper(velocity, cond, sampling, segments[i].start, window, key=("seg", i))
                    for i in mine
                }
                with self.timer("denoise"):
                    for step in dn.steps_range(min(starts.values()), sampling.steps, topo):
                        for i, stepper in steppers.items():
                            if step >= starts[i]:
                                mine[i] = stepper(mine[i], step)
                        resume.on_round_step(step, mine)
                results.update(topo.all_gather_data(mine))
                resume.save_segments({i: results[i] for i in todo})
            for index in sorted(results):
                seg = segments[index]
                latents = results[index][:, :, : min(window, kept - seg.start)].to(self.device)
                with self.timer("decode_write"):
                    for frames in self._decoded_uint8(latents):
                        if topo.is_main:
                            streamer.add(index, frames, writer)
                if topo.is_main:
                    streamer.finish_segment(index, writer)
        return streamer.close()

    def _decoded_uint8(self, latents: torch.Tensor):
        """Decode split over all ranks; yields uint8 ``[n, H, W, 3]`` chunks on rank 0 (empty elsewhere)."""
        from avatar.models.vae import to_vae_space
        from avatar.pipeline.decode import distributed_decode_frames

        for frames in distributed_decode_frames(self.vae, to_vae_space(self.vae, latents), self.topo):
            if self.topo.is_main:
                yield to_uint8(frames)

    # --- reports ------------------------------------------------------------------------------------------------------

    def _save_intermediates(self, job: Job, tensors: dict) -> None:
        """``<output>.intermediates.pt``: the noise and conditioning (before denoising), then also the final latents
        (``shift``/``blend``); ``dn.load_intermediates`` + ``dn.denoise_window_strategy`` reproduce the run."""
        from avatar.io.atomic import atomic_torch_save

        atomic_torch_save(tensors, job.output + ".intermediates.pt")

    def _report(self, job: Job, inputs: Inputs, strategy: str, stats, seams, seconds: float) -> dict:
        import diffusers
        import transformers

        return {
            "output": os.path.abspath(job.output),
            "videoid": job.videoid,
            "seed": job.seed,
            "steps": job.steps,
            "prompt": job.prompt,
            "strategy": strategy,
            "num_frames": inputs.num_frames,
            "fps": self.cfg.audio.fps,
            "duration_seconds": inputs.num_frames / self.cfg.audio.fps,
            "resolution": [inputs.width, inputs.height],
            "inputs": {
                "image": os.path.abspath(job.image),
                "audio": os.path.abspath(job.audio),
                "sha256": inputs.hashes,
            },
            "plan": {
                "world": self.topo.world,
                "data": self.topo.data_size,
                "cfg": self.topo.cfg_size,
                "sequence": getattr(self.topo.seq, "world", 1),
            },
            "denoise": asdict(stats),
            "seams": seams,
            "timings_seconds": {k: round(v, 3) for k, v in self.timer.seconds.items()},
            "seconds_total": round(seconds, 3),
            "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "config": config_dict(self.cfg),
        }


def config_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoded ``[n, 3, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]`` by truncation, as the official code does."""
    return ((frames.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _with_steps(sampling, steps: int):
    from dataclasses import replace

    return replace(sampling, steps=steps)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(type(obj).__name__)


__all__ = ["Job", "Inputs", "Renderer", "load_inputs", "choose_strategy", "InputError", "json"]
